//! `fp8forge`: the command line. It parses arguments, calls one library function per command,
//! and renders the result (progress bars, tables, JSON). No logic of its own.

mod autotune;
mod bench;
mod commands;
mod demo;
mod failure;
mod kernels;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    fp8forge_formats::sigbus::install("fp8forge: error: ", 2);
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            if !e.message.is_empty() {
                output::note(&format!("fp8forge: error: {}", e.message));
            }
            ExitCode::from(e.code)
        }
    }
}
