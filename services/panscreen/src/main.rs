//! The `panscreen` command. Parse, set up logging, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    panscreen_preprocess::keep_freed_memory();
    let cli = panscreen::cli::Cli::parse();
    match panscreen::cli::execute(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
