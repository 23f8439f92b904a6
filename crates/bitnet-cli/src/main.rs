//! `bitnet`: one binary for a ternary model's whole life.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cmd;
mod config;

/// bitnet-rust: convert, inspect, run and serve 1.58-bit (ternary) models.
#[derive(Debug, Parser)]
#[command(name = "bitnet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what a model file or directory holds: architecture, metadata, tensors, bits per weight.
    Inspect(cmd::inspect::Args),
    /// Generate text from a prompt, streaming it as it comes.
    Run(cmd::run::Args),
    /// Benchmark prompt processing and generation (like llama-bench), against measured bandwidth.
    Bench(cmd::bench::Args),
    /// Chat with a model in the terminal, using its chat template.
    Chat(cmd::chat::Args),
    /// Convert a Hugging Face BitNet directory or a BitNet GGUF to a ternary GGUF (TQ2_0, TQ1_0, I2_S).
    Convert(cmd::convert::Args),
    /// Report what ternarization costs a model: per-tensor error per scale granularity, and
    /// perplexity before and after conversion.
    Quantize(cmd::quantize::Args),
    /// Write the logits of every position to a .npy file.
    Logits(cmd::logits::Args),
    /// Perplexity of a text file (llama.cpp's method).
    Perplexity(cmd::perplexity::Args),
    /// Train a ternary (BitNet b1.58) model: quantization-aware, from scratch or from float
    /// weights, with checkpoints, --resume and exports to GGUF and Hugging Face.
    Train(Box<cmd::train::Args>),
    /// Write the configuration file, asking for each setting (or `--yes` for the defaults).
    Init(cmd::init::Args),
    /// Check this machine and configuration, and say what to fix.
    Doctor(cmd::doctor::Args),
    /// List the models in the models directory (what `-m NAME` finds).
    Models(cmd::models::Args),
    /// Serve models through an OpenAI-compatible API (continuous batching, API keys, metrics).
    Serve(Box<cmd::serve::Args>),
    /// Run quantization jobs from the database queue (scale-out beside `bitnet serve`).
    Worker(cmd::worker::Args),
    /// Create, list and revoke API keys: operator, organization admin and project keys.
    Keys(cmd::platform::KeysArgs),
    /// Create and list organizations (the platform's tenants).
    Orgs(cmd::platform::OrgsArgs),
    /// Verify or export the hash-chained audit log.
    Audit(cmd::platform::AuditArgs),
    /// Sign-in keys: rotate the access-token signing key, print the JWKS.
    Auth(cmd::platform::AuthArgs),
    /// Close a month into invoices (sent through Stripe), list them, link Stripe customers.
    Billing(cmd::billing::BillingArgs),
}

fn main() -> ExitCode {
    // Before any HTTPS client exists (trace export, single sign-on).
    bitnet_platform::sso::install_tls_provider();
    // llama-cli's single-dash `-cnv` (conversation mode) is `--cnv` here (`run --chat`).
    let cli =
        Cli::parse_from(std::env::args_os().map(|a| if a == "-cnv" { "--cnv".into() } else { a }));
    bitnet_model::failpoints_from_env();
    let result = match cli.command {
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Quantize(args) => cmd::quantize::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Perplexity(args) => cmd::perplexity::run(args),
        Command::Train(args) => cmd::train::run(*args),
        Command::Init(args) => cmd::init::run(args),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Models(args) => cmd::models::run(args),
        Command::Serve(args) => cmd::serve::run(*args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Keys(args) => cmd::platform::keys(args),
        Command::Orgs(args) => cmd::platform::orgs(args),
        Command::Audit(args) => cmd::platform::audit(args),
        Command::Auth(args) => cmd::platform::auth(args),
        Command::Billing(args) => cmd::billing::billing(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`bitnet inspect m.gguf | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: a cause whose text its parent already
/// ends with (an I/O error inside "PATH: error"), or a path a message already names, is not
/// repeated.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let mut text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        // "cannot load model P" followed by "P: not a GGUF file": the path once.
        if let Some((path, rest)) = text.split_once(": ")
            && path.len() > 1
            && line.contains(path)
        {
            text = rest.to_string();
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_lines_say_each_thing_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(io)
            .context("/x: No such file or directory")
            .context("cannot read /x");
        assert_eq!(
            super::error_line(&e),
            "cannot read /x: No such file or directory"
        );
    }
}
