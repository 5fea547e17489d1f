//! The `confer` command. Everything lives in the `confer_cli` library so
//! that tests can drive the same code.

fn main() -> std::process::ExitCode {
    confer_cli::main()
}
