//! Rate limits: requests and tokens per minute, counted over a sliding window of exactly one
//! minute, in this process or in Redis so that every replica counts against the same window.
//!
//! A window is a log of admitted requests (id, time, weight): a request is admitted when every
//! limit it falls under has room for its weight (1 for requests; prompt plus `max_tokens` for
//! tokens, reserved before the model runs), and then it is logged under all of them at once or
//! under none. When the request ends, its token weight is settled to what it used. A log is
//! exact where a token bucket (GCRA) is not: no more than the limit is ever admitted within
//! any minute, so N requests per minute means N, however many replicas share the count.
//!
//! In Redis, one script (atomic on the server, timed by the server's clock) checks and logs
//! every limit of a request: a sorted set of ids by time and a hash of their weights per limit.
//! Redis Cluster is not supported (a request's limits may live in different slots).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The window every limit counts over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// One limit a request falls under.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The counter's name: scope and kind (`proj_1:model:requests`).
    pub key: String,
    pub kind: Kind,
    pub max: u64,
    /// What this request weighs against it.
    pub cost: u64,
}

/// A limit's state as a request saw it, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone)]
pub struct Seen {
    pub kind: Kind,
    pub limit: u64,
    /// Room left after this request (when admitted) or now (when refused).
    pub remaining: u64,
    /// Until the window has all its room again (admitted), or until the oldest entry leaves
    /// it (refused).
    pub reset: Duration,
    /// Whether this limit refused the request.
    pub refused: bool,
}

#[derive(Debug, Clone)]
pub struct Verdict {
    pub admitted: bool,
    pub seen: Vec<Seen>,
}

impl Verdict {
    /// The limit that refused the request.
    pub fn refused_by(&self) -> Option<&Seen> {
        self.seen.iter().find(|s| s.refused)
    }
}

#[derive(Debug)]
pub enum Limiter {
    Local(Mutex<HashMap<String, Window>>),
    Redis(redis::aio::ConnectionManager),
}

/// One limit's log in this process, with the sum of its weights.
#[derive(Debug, Default)]
pub struct Window {
    log: VecDeque<Entry>,
    sum: u64,
}

#[derive(Debug, Clone)]
pub struct Entry {
    at_ms: u64,
    member: String,
    weight: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks and logs every limit (`KEYS`, with `ARGV` = window ms, member, then max and cost per
/// key); returns admitted (1/0) followed by used and oldest-entry age in ms per key. Each limit
/// keeps its log (`KEY`, ids by time), their weights (`KEY:w`) and their sum (`KEY:s`), so a
/// check costs the entries that left the window, not the whole window.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local member = ARGV[2]
local ok = 1
local out = {}
for i, key in ipairs(KEYS) do
  local w, sum = key .. ':w', key .. ':s'
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - window)
  for j = 1, #old, 500 do
    local part = {unpack(old, j, math.min(j + 499, #old))}
    local gone = 0
    for _, v in ipairs(redis.call('HMGET', w, unpack(part))) do
      if v then gone = gone + tonumber(v) end
    end
    redis.call('HDEL', w, unpack(part))
    redis.call('DECRBY', sum, gone)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local used = tonumber(redis.call('GET', sum) or '0')
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local age = -1
  if #first > 0 then age = now - tonumber(first[2]) end
  if used + tonumber(ARGV[2 + 2 * i]) > tonumber(ARGV[1 + 2 * i]) then ok = 0 end
  out[2 * i - 1] = used
  out[2 * i] = age
end
if ok == 1 then
  for i, key in ipairs(KEYS) do
    local cost = tonumber(ARGV[2 + 2 * i])
    redis.call('ZADD', key, now, member)
    redis.call('HSET', key .. ':w', member, cost)
    redis.call('INCRBY', key .. ':s', cost)
    for _, k in ipairs({key, key .. ':w', key .. ':s'}) do redis.call('PEXPIRE', k, window) end
  end
end
table.insert(out, 1, ok)
return out
";

/// Sets a logged entry's weight (`KEYS[1]`'s member `ARGV[1]` to `ARGV[2]`) if it is still in
/// the window, and the window's sum with it.
const SETTLE: &str = r"
local old = redis.call('HGET', KEYS[1] .. ':w', ARGV[1])
if old then
  redis.call('HSET', KEYS[1] .. ':w', ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[1] .. ':s', tonumber(ARGV[2]) - tonumber(old))
end
return 0
";

impl Limiter {
    pub fn local() -> Self {
        Self::Local(Mutex::new(HashMap::new()))
    }

    /// Count in Redis at `url` (one connection, reconnected when it drops).
    pub async fn redis(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("Redis URL {url}: {e}"))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
        Ok(Self::Redis(conn))
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// Admit `member` under every limit, or under none.
    pub async fn admit(&self, member: &str, limits: &[Limit]) -> Result<Verdict, String> {
        let window = WINDOW.as_millis() as u64;
        // (used, age of the oldest entry) per limit.
        let (admitted, state): (bool, Vec<(u64, Option<u64>)>) = match self {
            Self::Local(m) => {
                let now = now_ms();
                let mut map = m.lock().unwrap_or_else(|p| p.into_inner());
                let mut state = Vec::with_capacity(limits.len());
                for l in limits {
                    let w = map.entry(l.key.clone()).or_default();
                    while let Some(e) = w.log.front().filter(|e| e.at_ms + window <= now) {
                        w.sum -= e.weight;
                        w.log.pop_front();
                    }
                    state.push((w.sum, w.log.front().map(|e| now - e.at_ms)));
                }
                let ok = limits
                    .iter()
                    .zip(&state)
                    .all(|(l, (used, _))| used + l.cost <= l.max);
                if ok {
                    for l in limits {
                        let w = map.entry(l.key.clone()).or_default();
                        w.sum += l.cost;
                        w.log.push_back(Entry {
                            at_ms: now,
                            member: member.to_string(),
                            weight: l.cost,
                        });
                    }
                }
                // Forget windows gone quiet, so the map does not grow without bound.
                if map.len() > 10_000 {
                    map.retain(|_, w| w.log.back().is_some_and(|e| e.at_ms + window > now));
                }
                (ok, state)
            }
            Self::Redis(conn) => {
                let script = redis::Script::new(ADMIT);
                let mut inv = script.prepare_invoke();
                for l in limits {
                    inv.key(&l.key);
                }
                inv.arg(window).arg(member);
                for l in limits {
                    inv.arg(l.max).arg(l.cost);
                }
                let out: Vec<i64> = inv
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(|e| format!("Redis: {e}"))?;
                if out.len() != 1 + 2 * limits.len() {
                    return Err(format!("Redis: the limit script answered {out:?}"));
                }
                let state = out[1..]
                    .chunks(2)
                    .map(|c| (c[0].max(0) as u64, (c[1] >= 0).then_some(c[1] as u64)))
                    .collect();
                (out[0] == 1, state)
            }
        };
        let seen = limits
            .iter()
            .zip(state)
            .map(|(l, (used, age))| {
                let refused = used + l.cost > l.max;
                let after = if admitted { used + l.cost } else { used };
                // Admitted: the window is whole again a minute after this request. Refused:
                // room comes back as the oldest entry leaves.
                let reset = match (admitted, age) {
                    (true, _) => WINDOW,
                    (false, Some(a)) => Duration::from_millis(window.saturating_sub(a)),
                    (false, None) => Duration::ZERO,
                };
                Seen {
                    kind: l.kind,
                    limit: l.max,
                    remaining: l.max.saturating_sub(after),
                    reset,
                    refused: !admitted && refused,
                }
            })
            .collect();
        Ok(Verdict { admitted, seen })
    }

    /// Set `member`'s weight under `key` to what it used (tokens reserved and not used go
    /// back to the window).
    pub async fn settle(&self, key: &str, member: &str, weight: u64) -> Result<(), String> {
        match self {
            Self::Local(m) => {
                let mut map = m.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(w) = map.get_mut(key)
                    && let Some(e) = w.log.iter_mut().rev().find(|e| e.member == member)
                {
                    w.sum = w.sum - e.weight + weight;
                    e.weight = weight;
                }
                Ok(())
            }
            Self::Redis(conn) => {
                let _: i64 = redis::Script::new(SETTLE)
                    .key(key)
                    .arg(member)
                    .arg(weight)
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(|e| format!("Redis: {e}"))?;
                Ok(())
            }
        }
    }
}

/// OpenAI's reset format: `1s`, `6m0s`, `20ms`, `1m30.5s`.
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, s) = (ms / 60_000, (ms % 60_000) as f64 / 1000.0);
    let s = if s.fract() == 0.0 {
        format!("{}s", s as u64)
    } else {
        format!("{}s", (s * 1000.0).round() / 1000.0)
    };
    if m > 0 { format!("{m}m{s}") } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(key: &str, kind: Kind, max: u64, cost: u64) -> Limit {
        Limit {
            key: key.into(),
            kind,
            max,
            cost,
        }
    }

    #[tokio::test]
    async fn a_window_admits_its_limit_and_no_more_and_all_limits_or_none() {
        let l = Limiter::local();
        for i in 0..3 {
            let v = l
                .admit(
                    &format!("r{i}"),
                    &[limit("p:requests", Kind::Requests, 3, 1)],
                )
                .await
                .unwrap();
            assert!(v.admitted);
            assert_eq!(v.seen[0].remaining, 2 - i);
        }
        let v = l
            .admit("r3", &[limit("p:requests", Kind::Requests, 3, 1)])
            .await
            .unwrap();
        assert!(!v.admitted);
        assert!(v.refused_by().is_some_and(|s| s.kind == Kind::Requests));
        assert!(v.seen[0].reset > Duration::from_secs(50));
        // Tokens: a request over the room is refused and logs nothing under the other limit.
        let both = |cost| {
            vec![
                limit("q:requests", Kind::Requests, 10, 1),
                limit("q:tokens", Kind::Tokens, 100, cost),
            ]
        };
        assert!(l.admit("a", &both(60)).await.unwrap().admitted);
        let v = l.admit("b", &both(60)).await.unwrap();
        assert!(!v.admitted);
        assert_eq!(
            v.seen[0].remaining, 9,
            "the refused request took no request"
        );
        assert!(v.seen[1].refused && !v.seen[0].refused);
        // Settling gives back what was reserved and not used.
        l.settle("q:tokens", "a", 20).await.unwrap();
        assert!(l.admit("b", &both(60)).await.unwrap().admitted);
    }

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_secs(1)), "1s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_millis(90_500)), "1m30.5s");
    }
}
