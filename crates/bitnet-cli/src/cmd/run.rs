//! `bitnet run`: generate text from a prompt, streaming it, then report speed.

use super::common::{ModelArgs, PromptArgs, SamplingArgs, n_predict, peak_rss_bytes};
use anyhow::{Context, Result, bail};
use bitnet_model::chat::{ChatTemplate, Message, turn_end_tokens};
use bitnet_model::generate::{GenerateOptions, generate};
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: PromptArgs,
    /// Tokens to generate (-1: until the end of the text or the context).
    #[arg(
        short = 'n',
        long = "n-predict",
        default_value_t = 128,
        allow_negative_numbers = true
    )]
    pub n: i64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// If the prompt is longer than the context, keep its last tokens instead of failing.
    #[arg(long)]
    pub truncate: bool,
    /// Print one JSON object (token ids, text, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Wrap the prompt in the model's chat template as a user message (llama-cli's
    /// `-cnv`), and stop at the end of the turn.
    #[arg(long, visible_alias = "cnv")]
    pub chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let m = args.model.load()?;
    let mut prompt = if args.chat {
        args.input.ids_with(&m, |tok, text| {
            let source = tok.chat_template.as_deref().context(
                "--chat: this model ships no chat template; run without --chat for plain completion",
            )?;
            let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
            let template = ChatTemplate::new(source, &name(tok.bos_id), &name(tok.eos_id))?;
            let mut messages: Vec<Message> =
                args.system.iter().map(|s| Message::new("system", s)).collect();
            messages.push(Message::new("user", text));
            Ok(tok.encode(&template.render(&messages, true)?, false)?)
        })?
    } else {
        args.input.ids(&m)?
    };
    let ctx = m.model.spec.context;
    if prompt.len() >= ctx {
        if !args.truncate {
            bail!(
                "the prompt is {} tokens, the context holds {ctx}: shorten it, raise --ctx, or pass --truncate to keep its last {} tokens",
                prompt.len(),
                ctx - 1
            );
        }
        prompt.drain(..prompt.len() - (ctx - 1));
    }
    let tok = m.tokenizer.as_ref();
    let mut stop_tokens = Vec::new();
    if !args.ignore_eos {
        match (args.chat, tok) {
            (true, Some(t)) => stop_tokens = turn_end_tokens(t),
            (false, Some(t)) => stop_tokens.extend(t.eos_id),
            _ => {}
        }
    }
    let sampling = args.sampling.resolve(&m.sampling)?;
    if !args.json {
        eprintln!("sampling: {}", sampling.summary);
    }
    let opts = GenerateOptions {
        max_new_tokens: n_predict(args.n)?.min(ctx - prompt.len()),
        sampling: sampling.params,
        stop_tokens,
        stop_strings: args.stop.clone(),
    };
    let mut cache = m.model.new_cache();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let json = args.json;
    if !json && let Some(t) = tok {
        write!(out, "{}", t.decode(&prompt, false)?)?;
        out.flush()?;
    }
    let mut io_err = None;
    let g = generate(&m.model, tok, &prompt, &opts, &mut cache, &mut |text| {
        if !json && io_err.is_none() {
            io_err = write!(out, "{text}").and_then(|_| out.flush()).err();
        }
    })?;
    if let Some(e) = io_err {
        return Err(e.into());
    }
    if json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": g.tokens,
            "text": g.text,
            "finish_reason": g.finish.as_str(),
            "timings": {"prompt_tokens_per_sec": g.prompt_tok_per_sec(), "generation_tokens_per_sec": g.gen_tok_per_sec(),
                        "prompt_secs": g.prompt_secs, "generation_secs": g.gen_secs},
            "peak_rss_bytes": peak_rss_bytes(),
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        if tok.is_none() {
            writeln!(out, "tokens: {:?}", g.tokens)?;
        }
        // Ended by the room left in the context rather than by -n: say so.
        let wanted = n_predict(args.n)?;
        let room = ctx - prompt.len();
        let full = g.finish == bitnet_model::generate::FinishReason::ContextFull
            || (g.finish == bitnet_model::generate::FinishReason::Length
                && wanted > room
                && g.tokens.len() >= room);
        if full {
            eprintln!("\n(stopped: the context of {ctx} tokens is full; raise --ctx to go on)");
        }
        eprintln!(
            "\nprompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s | peak RSS {:.0} MiB",
            g.prompt_tokens,
            g.prompt_tok_per_sec(),
            g.tokens.len(),
            g.gen_tok_per_sec(),
            peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
