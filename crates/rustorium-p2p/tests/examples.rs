//! The examples, run as the README shows them: `echo_server` prints its PeerAddr,
//! `echo_client` sends it a request and prints the answer, and the server stops on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// An example's executable: cargo builds the examples beside the test binaries
/// (`target/<profile>/examples/`).
fn example(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("examples").join(name);
    assert!(path.exists(), "{} not built", path.display());
    path
}

#[test]
fn the_echo_examples_talk_to_each_other() {
    let mut server = Command::new(example("echo_server"))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = rx
        .recv_timeout(WAIT)
        .expect("echo_server printed no PeerAddr");
    assert!(addr.contains("@127.0.0.1:"), "{addr:?}");

    let client = Command::new(example("echo_client"))
        .args([addr.as_str(), "hello, example"])
        .output()
        .unwrap();
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&client.stdout).trim(),
        "hello, example"
    );
    let seen = rx
        .recv_timeout(WAIT)
        .expect("the server said nothing of the request");
    assert!(seen.starts_with("14 bytes from "), "{seen:?}");

    // Ctrl-C: the server shuts down and exits 0.
    let pid = server.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(server.wait());
    });
    let status = done_rx
        .recv_timeout(WAIT)
        .expect("echo_server did not exit on SIGINT")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
#[cfg(feature = "typed")]
fn the_typed_example_stores_and_reads_a_value() {
    let child = Command::new(example("typed_kv"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(WAIT)
        .expect("typed_kv did not finish")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("greeting -> Some(\"hello\")"), "{text}");
    assert!(text.contains("nothing -> None"), "{text}");
}
