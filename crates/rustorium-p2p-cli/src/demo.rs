//! `demo`: a small network on loopback in one process; every node requests every other
//! over the real stack (UDP, QUIC, TLS), and the table says what happened and how fast.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use rustorium_p2p::{Bytes, Node, RequestContext, RequestOptions};
use tokio::sync::mpsc;

use futures_util::future::join_all;

#[derive(Args)]
pub struct DemoArgs {
    /// How many nodes (2 to 16).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=16))]
    nodes: u16,
    /// Sequential 64-byte echo requests per pair (1 to 1,000,000).
    #[arg(long, default_value_t = 200, value_parser = requests)]
    requests: usize,
}

/// `--requests`: at least one, or there is nothing to time.
fn requests(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a number of requests from 1 to 1000000"
        )),
    }
}

const CONCURRENT: usize = 64;
const BULK: usize = 1 << 20;

struct Row {
    from: usize,
    to: usize,
    connection: &'static str,
    sequential_ok: usize,
    p50: Duration,
    p99: Duration,
    concurrent_ok: usize,
    concurrent_time: Duration,
    bulk: Option<Duration>,
    one_way: bool,
    errors: Vec<String>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let count = usize::from(args.nodes);
    let (note_tx, mut note_rx) = mpsc::channel::<(usize, Bytes)>(1024);
    let mut nodes = Vec::new();
    for index in 0..count {
        let tx = note_tx.clone();
        let builder =
            Node::builder().route("demo/note", move |_ctx: RequestContext, body: Bytes| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((index, body)).await;
                    Ok(Bytes::new())
                }
            });
        let (builder, info) = crate::system::routes(builder);
        let node = builder.bind().await?;
        info.set(&node);
        nodes.push(node);
    }
    println!(
        "rustorium-p2p demo: {count} nodes on 127.0.0.1, each requesting every other over QUIC + TLS 1.3"
    );
    for (i, node) in nodes.iter().enumerate() {
        println!("  node {i}: {}", node.peer_addr());
    }
    println!();

    let mut rows = Vec::new();
    for from in 0..count {
        for to in 0..count {
            if from != to {
                rows.push(exercise(&nodes, from, to, args.requests, &mut note_rx).await);
            }
        }
    }

    println!(
        "{:<6} {:<6} {:<8} {:>11} {:>9} {:>9} {:>14} {:>11} {:>8}",
        "from", "to", "conn", "echo 64 B", "p50", "p99", "64 in flight", "1 MiB echo", "one-way"
    );
    for row in &rows {
        println!(
            "{:<6} {:<6} {:<8} {:>11} {:>9} {:>9} {:>14} {:>11} {:>8}",
            row.from,
            row.to,
            row.connection,
            format!("{}/{}", row.sequential_ok, args.requests),
            micros(row.p50),
            micros(row.p99),
            format!(
                "{}/{} {:.1} ms",
                row.concurrent_ok,
                CONCURRENT,
                ms(row.concurrent_time)
            ),
            row.bulk
                .map_or("failed".into(), |d| format!("{:.1} ms", ms(d))),
            if row.one_way { "ok" } else { "LOST" },
        );
    }
    println!();

    // Counted before the extra client below comes and goes.
    let connections: usize = nodes.iter().map(|n| n.connection_count()).sum::<usize>() / 2;
    let mut extra_failures = Vec::new();
    if let Err(e) = reconnect_and_rebind(&nodes[1]).await {
        extra_failures.push(e);
    }
    println!();

    let failures: Vec<&String> = rows
        .iter()
        .flat_map(|r| &r.errors)
        .chain(&extra_failures)
        .collect();
    let expected_connections = count * (count - 1) / 2;
    let requests: usize = rows
        .iter()
        .map(|r| r.sequential_ok + r.concurrent_ok + usize::from(r.bulk.is_some()))
        .sum();
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    println!(
        "{}, {}, {}, {}; {} for {} (one per pair, used both ways)",
        plural(rows.len(), "pair", "pairs"),
        plural(requests, "request answered", "requests answered"),
        plural(
            rows.iter().filter(|r| r.one_way).count(),
            "one-way message delivered",
            "one-way messages delivered"
        ),
        plural(failures.len(), "failure", "failures"),
        plural(connections, "connection", "connections"),
        plural(expected_connections, "node pair", "node pairs"),
    );
    for failure in &failures {
        println!("  failure: {failure}");
    }
    for node in &nodes {
        node.shutdown().await;
    }
    let ok = failures.is_empty() && connections == expected_connections;
    if !ok && connections != expected_connections {
        println!("  failure: expected {expected_connections} connections, found {connections}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn exercise(
    nodes: &[Node],
    from: usize,
    to: usize,
    requests: usize,
    notes: &mut mpsc::Receiver<(usize, Bytes)>,
) -> Row {
    let (client, server) = (&nodes[from], &nodes[to]);
    let peer = server.peer_id();
    let mut row = Row {
        from,
        to,
        connection: if client.connected_peers().contains(&peer) {
            "reused"
        } else {
            "dialed"
        },
        sequential_ok: 0,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        concurrent_ok: 0,
        concurrent_time: Duration::ZERO,
        bulk: None,
        one_way: false,
        errors: Vec::new(),
    };
    if let Err(e) = client.connect(&server.peer_addr()).await {
        row.errors.push(format!("{from} -> {to}: connect: {e}"));
        return row;
    }

    let body = Bytes::from(vec![0xab; 64]);
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        match client.request(peer, "sys/echo", body.clone()).await {
            Ok(answer) if answer == body => times.push(start.elapsed()),
            Ok(_) => row
                .errors
                .push(format!("{from} -> {to}: echo answered other bytes")),
            Err(e) => row.errors.push(format!("{from} -> {to}: echo: {e}")),
        }
    }
    row.sequential_ok = times.len();
    times.sort();
    if !times.is_empty() {
        row.p50 = times[times.len() / 2];
        row.p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    }

    let start = Instant::now();
    let batch = (0..CONCURRENT).map(|i| {
        let body = Bytes::from(format!("request {i} from {from} to {to}"));
        async move { (client.request(peer, "sys/echo", body.clone()).await, body) }
    });
    for (answer, sent) in join_all(batch).await {
        match answer {
            Ok(answer) if answer == sent => row.concurrent_ok += 1,
            Ok(_) => row
                .errors
                .push(format!("{from} -> {to}: concurrent echo mismatched")),
            Err(e) => row
                .errors
                .push(format!("{from} -> {to}: concurrent echo: {e}")),
        }
    }
    row.concurrent_time = start.elapsed();

    let bulk: Bytes = (0..BULK)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let start = Instant::now();
    match client.request(peer, "sys/echo", bulk.clone()).await {
        Ok(answer) if answer == bulk => row.bulk = Some(start.elapsed()),
        Ok(_) => row
            .errors
            .push(format!("{from} -> {to}: 1 MiB echo differs")),
        Err(e) => row.errors.push(format!("{from} -> {to}: 1 MiB echo: {e}")),
    }

    let note = Bytes::from(format!("note from {from} to {to}"));
    match client.send(peer, "demo/note", note.clone()).await {
        Err(e) => row.errors.push(format!("{from} -> {to}: one-way: {e}")),
        Ok(()) => match tokio::time::timeout(Duration::from_secs(5), notes.recv()).await {
            Ok(Some((at, body))) if at == to && body == note => row.one_way = true,
            Ok(other) => row
                .errors
                .push(format!("{from} -> {to}: one-way: got {other:?}")),
            Err(_) => row.errors.push(format!(
                "{from} -> {to}: one-way message not handled within 5 s"
            )),
        },
    }
    row
}

/// A fresh node: full handshake to `server`, then a 0-RTT reconnect, then a rebind to a
/// new socket in the middle of 200 requests. Prints what happened.
async fn reconnect_and_rebind(server: &Node) -> Result<(), String> {
    let client = Node::builder().bind().await.map_err(|e| e.to_string())?;
    let peer = server.peer_id();
    let ping = |options: RequestOptions| {
        let client = client.clone();
        async move {
            client
                .request_with(peer, "sys/ping", Bytes::new(), options)
                .await
        }
    };

    let start = Instant::now();
    client.add_address(server.peer_addr());
    ping(RequestOptions::new())
        .await
        .map_err(|e| format!("first request: {e}"))?;
    let full = start.elapsed();

    let mut events = client.events();
    client.disconnect(&peer);
    let _ = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    let start = Instant::now();
    ping(RequestOptions::new().idempotent(true))
        .await
        .map_err(|e| format!("0-RTT request: {e}"))?;
    let zero_rtt = start.elapsed();
    let stats = client.stats();
    println!(
        "full handshake + first answer: {} | 0-RTT reconnect + first answer: {} (0-RTT {})",
        micros(full),
        micros(zero_rtt),
        if stats.zero_rtt_attempted == 1 {
            "sent"
        } else {
            "not sent"
        }
    );
    if stats.zero_rtt_attempted != 1 {
        return Err("the reconnect did not use 0-RTT".into());
    }

    let old = client.local_addr();
    let batch = (0..200).map(|i| {
        let client = client.clone();
        async move {
            let body = Bytes::from(format!("request {i} across a rebind"));
            client
                .request(peer, "sys/echo", body.clone())
                .await
                .map(|a| a == body)
        }
    });
    let requests = join_all(batch);
    let rebind = async {
        tokio::task::yield_now().await;
        client.rebind("127.0.0.1:0".parse().expect("literal address"))
    };
    let (answers, new) = tokio::join!(requests, rebind);
    let new = new.map_err(|e| format!("rebind: {e}"))?;
    let ok = answers.iter().filter(|a| matches!(a, Ok(true))).count();
    println!(
        "rebind from {old} to {new} during 200 requests: {ok}/200 answered intact, {} connection(s)",
        client.connection_count()
    );
    client.shutdown().await;
    if ok == 200 {
        Ok(())
    } else {
        Err(format!("{} requests failed across the rebind", 200 - ok))
    }
}

fn micros(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
