//! The `rustorium-p2p` command: run a node, talk to one, manage keys, run the demo.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
