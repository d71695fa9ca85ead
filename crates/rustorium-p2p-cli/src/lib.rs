//! The `rustorium-p2p` command: argument parsing and dispatch to one module per command
//! group. A library too, so that tests and fuzz targets reach the configuration file
//! parser and the system routes.

mod client;
pub mod config_file;
mod demo;
mod keys;
mod link;
pub mod metrics_http;
mod node;
pub mod system;
mod transfer;

use rustorium_p2p_bench as bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Rustorium peer-to-peer node: authenticated QUIC request/response between peers.
#[derive(Parser)]
#[command(name = "rustorium-p2p", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new Ed25519 key file (PKCS#8 PEM, mode 0600) and print its PeerId.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the PeerId of a key file.
    Id {
        /// The key file (PKCS#8 PEM, as `keygen` or `openssl genpkey -algorithm ed25519` write).
        #[arg(long)]
        key: PathBuf,
    },
    /// Run a node until Ctrl-C or SIGTERM. Prints its PeerAddr as the first line on stdout.
    Node(node::NodeArgs),
    /// Send a request and print the answer body to stdout.
    Request(client::RequestArgs),
    /// Send a one-way message.
    Send(client::MessageArgs),
    /// Measure round-trip times of `sys/ping` requests.
    Ping(client::PingArgs),
    /// Start a small network on loopback, have every node request every other, print a table.
    Demo(demo::DemoArgs),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure our stack side by side with raw quinn and TCP + TLS on 127.0.0.1.
    Bench(bench::BenchArgs),
    /// A server for the bench's scale scenarios (started by `bench` itself).
    #[command(hide = true)]
    BenchServer(bench::scale::ServerArgs),
    /// The dialing side of the bench's scale scenarios (started by `bench` itself).
    #[command(hide = true)]
    BenchClient(bench::scale::ClientArgs),
    /// One side of the bench's head-of-line scenario (started by `bench` itself).
    #[command(hide = true)]
    BenchHol(bench::hol::HolArgs),
    /// Relay UDP between a client and a server through an impaired link (loss, delay,
    /// jitter, reordering, duplication, rate cap). Prints its address, then stats on exit.
    Link(link::LinkArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the complete default configuration, every key commented.
    Default,
    /// Check a configuration file (exit 2 with the reason if it is not valid).
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// Runs the command; errors go to stderr with a non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Node(_)) {
        // `node` sets up logging once it has read its config.
        init_logging("warn", config_file::LogFormat::Pretty);
    }
    let result = match cli.command {
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config_file::DEFAULT_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => node::check_config(&file),
        Command::Keygen { out } => keys::keygen(&out),
        Command::Id { key } => keys::id(&key),
        command => runtime_for(&command).and_then(|rt| {
            rt.block_on(async move {
                match command {
                    Command::Node(args) => node::run(args).await,
                    Command::Request(args) => client::request(args).await,
                    Command::Send(args) => client::send(args).await,
                    Command::Ping(args) => client::ping(args).await,
                    Command::Demo(args) => demo::run(args).await,
                    Command::Link(args) => link::run(args).await,
                    Command::Bench(args) => bench::run(args).await,
                    Command::BenchServer(args) => bench::scale::serve(args).await,
                    Command::BenchClient(args) => bench::scale::dial(args).await,
                    Command::BenchHol(args) => bench::hol::run_side(args).await,
                    Command::Keygen { .. } | Command::Id { .. } | Command::Config(_) => {
                        unreachable!("handled without a runtime")
                    }
                }
            })
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A mistake in how a command was called that its flags' parsers cannot see alone (exit 2,
/// as clap's own usage errors).
#[derive(Debug)]
pub(crate) struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// The runtime a command runs on: tokio's multi-thread one, but a single-threaded one for
/// `bench-server --current-thread` (raw quinn's strongest configuration).
fn runtime_for(command: &Command) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::BenchServer(args) if args.current_thread() => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(builder.enable_all().build()?)
}

/// Logs to stderr, filtered by `RUST_LOG` if set, else by `default_level`; colours only
/// when stderr is a terminal.
pub(crate) fn init_logging(default_level: &str, format: config_file::LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        config_file::LogFormat::Json => builder.json().init(),
        config_file::LogFormat::Pretty => builder.init(),
    }
}

/// An error and its sources on one line, each source added only if the text so far does
/// not already say it (the library's messages quote their sources).
pub(crate) fn report(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_say_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let key = rustorium_p2p::KeyError::Read {
            path: "k.pem".into(),
            source: io,
        };
        let err = anyhow::Error::from(key).context("starting the node");
        assert_eq!(
            super::report(&err),
            "starting the node: key file k.pem: cannot read it: gone"
        );
    }
}
