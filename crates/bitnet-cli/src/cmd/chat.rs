//! `bitnet chat`: an interactive conversation in the terminal, with the model's own chat
//! template and history kept in the KV cache between turns.
//!
//! On a terminal the input line is `rustyline` (editing, history); Ctrl-C stops the reply being
//! written and keeps the conversation (a second Ctrl-C at an empty prompt quits), Ctrl-D quits,
//! and what was typed while a reply was written is discarded rather than sent as the next
//! message. From a pipe, each line is a message.

use super::common::{ModelArgs, SamplingArgs, n_predict, tokenizer};
use anyhow::{Context, Result, bail};
use bitnet_formats::tokenizer::TextTokenizer;
use bitnet_model::LoadedModel;
use bitnet_model::chat::{ChatTemplate, Message, turn_end_tokens};
use bitnet_model::generate::{FinishReason, GenerateOptions, generate_until};
use bitnet_model::kv::KvCache;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system prompt to start the conversation with (`/system TEXT` changes it).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply (-1: until the end of the text or the context).
    #[arg(
        short = 'n',
        long = "n-predict",
        default_value_t = 512,
        allow_negative_numbers = true
    )]
    pub n: i64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// End a reply when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Print each reply as one JSON object (text, tokens, finish reason, speed) instead of text.
    #[arg(long)]
    pub json: bool,
}

const HELP: &str = "commands:
  /help          this list
  /clear         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (the conversation stays)
  /save FILE     write the conversation to FILE as JSON (OpenAI's messages)
  /exit          quit (also Ctrl-D, or Ctrl-C twice at an empty prompt)
Ctrl-C while a reply is written stops it; the conversation goes on.";

/// Set by Ctrl-C while a reply is being written (the terminal delivers SIGINT then; while a
/// line is read, rustyline sees the key itself).
static STOP: AtomicBool = AtomicBool::new(false);

/// What a line asks for.
enum Turn {
    Say(String),
    Done,
    Exit,
}

struct Session<'a> {
    m: &'a LoadedModel,
    tok: &'a TextTokenizer,
    template: ChatTemplate,
    opts: GenerateOptions,
    json: bool,
    messages: Vec<Message>,
    cache: KvCache,
    /// The token ids currently held by the cache, to reuse the shared prefix between turns.
    cached: Vec<u32>,
}

impl Session<'_> {
    /// Handle a command line, or say it is a message.
    fn command(&mut self, line: &str) -> Result<Turn> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        Ok(match cmd {
            "/exit" | "/quit" | "/bye" => Turn::Exit,
            "/help" | "/?" => {
                eprintln!("{HELP}");
                Turn::Done
            }
            "/clear" | "/reset" => {
                self.messages.retain(|m| m.role == "system");
                self.cache.clear();
                self.cached.clear();
                eprintln!("(conversation cleared)");
                Turn::Done
            }
            "/system" => {
                self.messages.retain(|m| m.role != "system");
                if !rest.is_empty() {
                    self.messages.insert(0, Message::new("system", rest));
                }
                eprintln!(
                    "(system prompt {})",
                    if rest.is_empty() { "removed" } else { "set" }
                );
                Turn::Done
            }
            "/save" => {
                if rest.is_empty() {
                    eprintln!("/save needs a file name: /save chat.json");
                    return Ok(Turn::Done);
                }
                let v: Vec<serde_json::Value> = self
                    .messages
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                match std::fs::write(rest, serde_json::to_string_pretty(&v)? + "\n") {
                    Ok(()) => eprintln!("(saved {} messages to {rest})", v.len()),
                    Err(e) => eprintln!("cannot write {rest}: {e}"),
                }
                Turn::Done
            }
            c if c.starts_with('/') && !c.contains(char::is_whitespace) && c.len() > 1 => {
                eprintln!("unknown command {c}; /help lists them");
                Turn::Done
            }
            _ => Turn::Say(line.to_string()),
        })
    }

    /// Answer `text`, streaming the reply to stdout.
    fn reply(&mut self, text: &str) -> Result<()> {
        self.messages.push(Message::new("user", text));
        let rendered = self.template.render(&self.messages, true)?;
        let ids = self.tok.encode(&rendered, false)?;
        let ctx = self.m.model.spec.context;
        if ids.len() >= ctx {
            self.messages.pop();
            bail!(
                "the conversation is {} tokens, past the context of {ctx}: /clear to start over",
                ids.len()
            );
        }
        let keep = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        self.cache.truncate(keep);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut io_err = None;
        let json = self.json;
        STOP.store(false, Ordering::Relaxed);
        let g = generate_until(
            &self.m.model,
            Some(self.tok),
            &ids[keep..],
            &GenerateOptions {
                max_new_tokens: self.opts.max_new_tokens.min(ctx - ids.len()),
                ..self.opts.clone()
            },
            &mut self.cache,
            &mut |t| {
                if !json && io_err.is_none() {
                    io_err = write!(out, "{t}").and_then(|_| out.flush()).err();
                }
            },
            &|| STOP.load(Ordering::Relaxed),
        )?;
        if let Some(e) = io_err {
            return Err(e.into());
        }
        if json {
            let v = serde_json::json!({
                "text": g.text, "tokens": g.tokens, "finish_reason": g.finish.as_str(),
                "prompt_tokens": ids.len(), "generation_tokens_per_sec": g.gen_tok_per_sec(),
            });
            writeln!(out, "{v}")?;
        } else {
            writeln!(out)?;
        }
        self.cached = ids;
        self.cached.extend_from_slice(&g.tokens);
        self.cached.truncate(self.cache.len());
        self.messages.push(Message::new("assistant", g.text.trim()));
        match g.finish {
            FinishReason::Cancelled => eprintln!("[stopped]"),
            FinishReason::ContextFull => {
                eprintln!("[the context of {ctx} tokens is full: /clear to start over]")
            }
            _ => {}
        }
        Ok(())
    }
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
    let sampling = args.sampling.resolve(&m.sampling)?;
    let opts = GenerateOptions {
        max_new_tokens: n_predict(args.n)?,
        sampling: sampling.params,
        stop_tokens: turn_end_tokens(tok),
        stop_strings: args.stop.clone(),
    };
    let mut session = Session {
        m: &m,
        tok,
        template,
        opts,
        json: args.json,
        messages: args
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect(),
        cache: m.model.new_cache(),
        cached: Vec::new(),
    };
    eprintln!("sampling: {}", sampling.summary);
    if std::io::stdin().is_terminal() {
        interactive(&mut session)
    } else {
        piped(&mut session)
    }
}

/// Each line of standard input is a message (or a command).
fn piped(s: &mut Session<'_>) -> Result<()> {
    for line in std::io::stdin().lock().lines() {
        let line = line.context("cannot read from stdin")?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match s.command(text)? {
            Turn::Exit => break,
            Turn::Done => {}
            Turn::Say(t) => s.reply(&t)?,
        }
    }
    Ok(())
}

fn interactive(s: &mut Session<'_>) -> Result<()> {
    use rustyline::error::ReadlineError;
    ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed))
        .context("cannot install the Ctrl-C handler")?;
    let mut rl = rustyline::DefaultEditor::new().context("cannot open the line editor")?;
    eprintln!(
        "{}\nType a message and press Enter; /help lists the commands, Ctrl-D quits.",
        s.m.description
    );
    let mut interrupted = false;
    loop {
        // Keys pressed while the reply was written are not the next message.
        let _ = rustix::termios::tcflush(
            rustix::stdio::stdin(),
            rustix::termios::QueueSelector::IFlush,
        );
        let line = match rl.readline("> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                if interrupted {
                    break;
                }
                interrupted = true;
                eprintln!("(Ctrl-C again to quit, or /exit)");
                continue;
            }
            Err(ReadlineError::Eof) => {
                eprintln!();
                break;
            }
            Err(e) => return Err(e).context("cannot read the input line"),
        };
        interrupted = false;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(text);
        match s.command(text)? {
            Turn::Exit => break,
            Turn::Done => {}
            Turn::Say(t) => {
                if let Err(e) = s.reply(&t) {
                    eprintln!("error: {e:#}");
                }
            }
        }
    }
    Ok(())
}
