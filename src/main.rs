//! The `credvault` binary: everything it does lives in the library's `cli`.

/// mimalloc rather than glibc's malloc: every call allocates (requests,
/// responses, h2 frames, sled's nodes), and with glibc a refresh spent about
/// a tenth of its CPU in `malloc`/`free` (BENCHMARKS.md, notes of issue 17).
/// The benchmark harness declares the same allocator, so it measures this.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    credvault::cli::main()
}
