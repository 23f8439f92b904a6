//! Chat templates: the Jinja template a checkpoint ships, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`).

use crate::error::{ModelError, Result};
use bitnet_formats::tokenizer::TextTokenizer;
use serde::{Deserialize, Serialize};

/// Token strings that end an assistant turn in the common chat templates.
pub const TURN_ENDS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
    "<end_of_turn>",
];

/// Where a chat reply stops: the ids of the [`TURN_ENDS`] this tokenizer knows, and its EOS.
pub fn turn_end_tokens(tok: &TextTokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = TURN_ENDS
        .iter()
        .filter_map(|t| tok.token_to_id(t))
        .chain(tok.eos_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        // Templates are checkpoint data: bound their work.
        env.set_fuel(Some(50_000_000));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            strftime(&fmt, secs)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("cannot compile: {e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's turn
    /// begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| ModelError::Template(format!("{e:#}")))
    }
}

/// The `strftime` subset chat templates use (`%d %b %Y`, `%Y-%m-%d`, ...), in UTC, for
/// transformers' `strftime_now`.
pub fn strftime(fmt: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Days since 1970-01-01 to a proleptic Gregorian date (the era-based civil-from-days method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (m, wd) = ((month - 1) as usize, days.rem_euclid(7) as usize);
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out += &format!("{day:02}"),
            Some('e') => out += &format!("{day:2}"),
            Some('m') => out += &format!("{month:02}"),
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year.rem_euclid(100)),
            Some('B') => out += MONTHS[m],
            Some('b') | Some('h') => out += &MONTHS[m][..3],
            Some('A') => out += DAYS[wd],
            Some('a') => out += &DAYS[wd][..3],
            Some('H') => out += &format!("{:02}", secs / 3600),
            Some('M') => out += &format!("{:02}", secs / 60 % 60),
            Some('S') => out += &format!("{:02}", secs % 60),
            Some('j') => out += &format!("{:03}", doy_of_year(year, month, day)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn doy_of_year(year: i64, month: i64, day: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    cum[(month - 1) as usize] + day + i64::from(leap && month > 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2026-11-28 00:03:26 UTC, a Saturday.
        let t = 1_795_824_206;
        assert_eq!(strftime("%d %b %Y", t), "28 Nov 2026");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %j %%", t),
            "2026-11-28 00:03:26 Saturday 332 %"
        );
        assert_eq!(strftime("%d %B %Y", 0), "01 January 1970");
        assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
    }

    #[test]
    fn renders_chatml_and_raises() {
        let src = "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[Message::new("user", " hi ")], true).unwrap();
        assert_eq!(out, "<|user|>hi\n<|assistant|>");
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        assert!(
            t.render(&[], false)
                .unwrap_err()
                .to_string()
                .contains("no system role")
        );
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
