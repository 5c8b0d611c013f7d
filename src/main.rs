//! The `credvault` binary: everything it does lives in the library's `cli`.

fn main() -> std::process::ExitCode {
    credvault::cli::main()
}
