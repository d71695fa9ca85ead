//! The `rustorium-p2p` command: run a node, talk to one, manage keys, run the demo, the
//! bench and the impaired link.

fn main() -> std::process::ExitCode {
    rustorium_p2p_cli::main()
}
