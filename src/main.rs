//! The `lorap-gpu` binary: logging set-up and error reporting (one line, exit code by
//! error class) around `lorap_gpu::cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = lorap_gpu::cli::Cli::parse();
    match lorap_gpu::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", lorap_gpu::cli::error_line(&e));
            std::process::ExitCode::from(lorap_gpu::cli::classify(&e).exit_code())
        }
    }
}
