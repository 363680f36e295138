fn main() -> std::process::ExitCode {
    hotswap::main()
}
