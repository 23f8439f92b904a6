//! `bitnet chat`: an interactive conversation in the terminal, with the model's own chat
//! template and history kept in the KV cache between turns.

use super::common::{ModelArgs, SamplingArgs, tokenizer};
use anyhow::{Context, Result, bail};
use bitnet_model::chat::{ChatTemplate, Message, turn_end_tokens};
use bitnet_model::generate::{GenerateOptions, generate};
use std::io::{BufRead, IsTerminal, Write};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system prompt to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: Args) -> Result<()> {
    let m = args.model.load()?;
    let tok = tokenizer(&m)?;
    let source = tok
        .chat_template
        .as_deref()
        .context("this model ships no chat template (tokenizer.chat_template / tokenizer_config.json); use `bitnet run` for plain completion")?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let template = ChatTemplate::new(source, &name(tok.bos_id), &name(tok.eos_id))?;
    let stop_tokens = turn_end_tokens(tok);
    let sampling = args.sampling.resolve(&m.sampling)?;
    let opts = GenerateOptions {
        max_new_tokens: args.n,
        sampling: sampling.params,
        stop_tokens,
        stop_strings: Vec::new(),
    };
    let interactive = std::io::stdin().is_terminal();
    let mut messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut cache = m.model.new_cache();
    // The token ids currently held by the cache, to reuse the shared prefix between turns.
    let mut cached: Vec<u32> = Vec::new();
    let stdout = std::io::stdout();
    eprintln!("sampling: {}", sampling.summary);
    if interactive {
        eprintln!(
            "{}\nType a message and press Enter. /reset clears the history, /exit (or Ctrl-D) quits.",
            m.description
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("\n> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read from stdin")?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                cache.clear();
                cached.clear();
                if interactive {
                    eprintln!("(history cleared)");
                }
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        let rendered = template.render(&messages, true)?;
        let ids = tok.encode(&rendered, false)?;
        if ids.len() >= m.model.spec.context {
            bail!(
                "the conversation is {} tokens, past the context of {}: /reset to start over",
                ids.len(),
                m.model.spec.context
            );
        }
        let keep = cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        cache.truncate(keep);
        let mut out = stdout.lock();
        let mut io_err = None;
        let g = generate(
            &m.model,
            Some(tok),
            &ids[keep..],
            &GenerateOptions {
                max_new_tokens: opts.max_new_tokens.min(m.model.spec.context - ids.len()),
                ..opts.clone()
            },
            &mut cache,
            &mut |t| {
                if io_err.is_none() {
                    io_err = write!(out, "{t}").and_then(|_| out.flush()).err();
                }
            },
        )?;
        if let Some(e) = io_err {
            return Err(e.into());
        }
        writeln!(out)?;
        cached = ids;
        cached.extend_from_slice(&g.tokens);
        cached.truncate(cache.len());
        messages.push(Message::new("assistant", g.text.trim()));
        if interactive {
            eprintln!(
                "[{} tokens, {:.1} tok/s]",
                g.tokens.len(),
                g.gen_tok_per_sec()
            );
        }
    }
    Ok(())
}
