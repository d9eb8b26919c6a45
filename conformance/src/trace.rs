//! The trace format (see `conformance/FORMAT.md`): its syntax tree and a
//! parser whose errors name the file and the line.
//!
//! Pure: no I/O besides reading the file in [`Trace::load`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which kind of balancer a trace needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Backends are simulated agents speaking encap-proto (Viaduct only).
    Agent,
    /// Backends are simulated plain SIP servers (any SIP load balancer).
    Plain,
    /// The backend is the user's own (a command embedding the agent) behind
    /// a real `viaduct`: a black-box UAS.
    Backend,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Agent => "agent",
            Mode::Plain => "plain",
            Mode::Backend => "backend",
        })
    }
}

/// A SIP transport an actor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// SIP over TCP.
    Tcp,
    /// SIP over UDP.
    Udp,
}

/// What an actor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActorKind {
    /// A UA or proxy speaking SIP to the balancer.
    Peer {
        /// Its transport.
        net: Net,
        /// Its own address (e.g. `127.0.0.72`, `::1`).
        ip: String,
    },
    /// A backend whose agent dials the balancer and speaks encap-proto.
    Agent {
        /// The secret it proves (default: the cluster secret).
        secret: Option<String>,
        /// Not connected at the start: a `start` step connects it.
        deferred: bool,
    },
    /// A plain SIP server behind the balancer (plain-SIP mode).
    SipServer {
        /// Its transport.
        net: Net,
        /// Its own address.
        ip: String,
    },
    /// An instance of the user's backend command (backend mode): a
    /// black box that embeds the agent.
    Backend,
}

/// One actor of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Its name, unique in the trace.
    pub name: String,
    /// What it is.
    pub kind: ActorKind,
    /// The line that declares it.
    pub line: usize,
}

/// A comparison in an expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Equal to the value (after substitution).
    Eq(String),
    /// Not equal.
    Ne(String),
    /// Matches the regular expression.
    Matches(String),
    /// Does not match.
    NotMatches(String),
    /// Contains the text.
    Contains(String),
    /// The selected item is absent.
    Absent,
    /// The selected item is present.
    Present,
    /// Store the selected value in a variable.
    Capture(String),
}

/// One assertion line of an `expect` step: `SELECTOR OP VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    /// What to look at (`start`, `status`, `Via.received`, `frame.peer`...).
    pub selector: String,
    /// How to compare.
    pub op: Op,
    /// The line it is on.
    pub line: usize,
    /// The line as written (for reports).
    pub text: String,
}

/// What an `expect` step waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectKind {
    /// A SIP message.
    Sip,
    /// A CRLF keep-alive pong (RFC 5626).
    Pong,
    /// The connection (or agent link) closed.
    Closed,
    /// The agent was refused at its handshake.
    Refused,
}

/// Where a message is sent from, or expected at: `actor` or `actor/conn`;
/// either part may be a `${variable}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The actor.
    pub actor: String,
    /// The connection, for TCP peers.
    pub conn: Option<String>,
}

impl Endpoint {
    fn parse(s: &str) -> Endpoint {
        match s.split_once('/') {
            Some((a, c)) => Endpoint {
                actor: a.to_owned(),
                conn: Some(c.to_owned()),
            },
            None => Endpoint {
                actor: s.to_owned(),
                conn: None,
            },
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.conn {
            Some(c) => write!(f, "{}/{c}", self.actor),
            None => f.write_str(&self.actor),
        }
    }
}

/// How a message is written in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Written inline: bytes with `${variables}` still in them.
    Inline(Vec<u8>),
    /// A file of the corpus (`conformance/corpus/...`), sent byte for byte.
    File(PathBuf),
}

/// How an agent addresses a message it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// Explicitly: transport, next hop, connection id (all may hold variables).
    Explicit {
        /// `udp`, `tcp`...
        transport: String,
        /// `IP:PORT`.
        to: String,
        /// The inbound connection id it answers.
        conn: Option<String>,
    },
    /// As the backend agent does for a response: the next hop from the top
    /// Via of the message (received/rport, else sent-by), on the connection
    /// of the saved request `request`.
    ReplyTo(String),
    /// As the backend agent does for a request it originates: the next hop
    /// from the top Route, else the Request-URI.
    Request,
}

/// One step of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A TCP peer opens connection `conn` to the balancer.
    Connect {
        /// `actor/conn`.
        at: Endpoint,
    },
    /// A peer sends a SIP message (or raw bytes).
    Send {
        /// `actor` (UDP) or `actor/conn` (TCP).
        from: Endpoint,
        /// The bytes.
        payload: Payload,
        /// Send in chunks of this many bytes, a short pause between them.
        split: Option<usize>,
    },
    /// An agent sends a SIP message out through the balancer.
    AgentSend {
        /// The agent.
        agent: String,
        /// Where it goes.
        addressing: Addressing,
        /// The bytes.
        payload: Payload,
    },
    /// Wait for something at one of the targets.
    Expect {
        /// Alternatives (`b1|b2|b3`).
        targets: Vec<Endpoint>,
        /// The targets as written (a stable label for transcripts).
        label: String,
        /// What is awaited.
        kind: ExpectKind,
        /// How long to wait (default: the trace's timeout).
        within: Option<Duration>,
        /// Store the name of the actor that got it in this variable.
        who: Option<String>,
        /// Save the message under this name (for `reply`).
        save: Option<String>,
        /// `final`: provisional (1xx) responses arriving there first are
        /// passed over (a black-box UAS may or may not send them).
        final_only: bool,
        /// Assertions on the message.
        assertions: Vec<Assertion>,
    },
    /// Nothing arrives at these actors for a while.
    Quiet {
        /// The actors or connections watched.
        targets: Vec<Endpoint>,
        /// How long.
        within: Option<Duration>,
    },
    /// A peer closes a connection.
    Close {
        /// `actor/conn`.
        at: Endpoint,
    },
    /// An agent's link is cut (no GOODBYE), like a crash.
    Kill {
        /// The agent.
        agent: String,
    },
    /// An agent connects (again).
    Start {
        /// The agent.
        agent: String,
    },
    /// An agent announces a drain state.
    Drain {
        /// The agent.
        agent: String,
        /// `true`: draining; `false`: serving again.
        draining: bool,
    },
    /// Sleep.
    Wait(Duration),
    /// Set a variable.
    Set {
        /// Its name.
        name: String,
        /// Its value (substituted).
        value: String,
    },
}

/// A step and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The step.
    pub step: Step,
    /// Its first line.
    pub line: usize,
}

/// A parsed trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// `group/name`.
    pub id: String,
    /// The group (the folder under `traces/`).
    pub group: String,
    /// The name (the file stem).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// One line saying what it shows.
    pub title: String,
    /// The rule checked (RFC section or design.md section).
    pub rule: String,
    /// Which balancer mode it needs.
    pub mode: Mode,
    /// Known to fail on every target, with the reason; the runner checks
    /// it still fails.
    pub known_failure: Option<String>,
    /// Known to fail on one named target (`known-failure(NAME): REASON`).
    pub known_failure_on: Vec<(String, String)>,
    /// Default wait of an `expect`.
    pub timeout: Duration,
    /// Extra balancer configuration (TOML), merged into the runner's.
    pub config: String,
    /// The actors.
    pub actors: Vec<Actor>,
    /// The steps.
    pub steps: Vec<Located>,
}

/// A trace that does not parse: the file, the line, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", path.display())]
pub struct ParseError {
    /// The file.
    pub path: PathBuf,
    /// The line (1-based; 0 for the whole file).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The default wait of an `expect`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a duration: `300ms`, `2s`, `1.5s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<u64>().ok().map(Duration::from_millis);
    }
    let secs = s.strip_suffix('s')?;
    let v: f64 = secs.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v))
}

/// Decodes the escapes of a `\` message line: `\r`, `\n`, `\t`, `\\`,
/// `\$`, `\xHH`.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b
            .get(i + 1)
            .ok_or("a `\\` line ends with a lone backslash")?;
        i += 2;
        match c {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'\\' => out.push(b'\\'),
            // A literal `$` that is not a variable: kept escaped for the
            // substitution pass, which turns `\$` into `$`.
            b'$' => out.extend_from_slice(b"\\$"),
            b'x' => {
                let hex = s.get(i..i + 2).ok_or("`\\x` needs two hex digits")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad hex `{hex}`"))?);
                i += 2;
            }
            other => return Err(format!("unknown escape `\\{}`", other as char)),
        }
    }
    Ok(out)
}

struct Lines<'a> {
    lines: Vec<&'a str>,
    pos: usize,
}

impl<'a> Lines<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.lines.get(self.pos).copied()
    }
    /// The 1-based number of the line `peek` returns.
    fn number(&self) -> usize {
        self.pos + 1
    }
}

fn is_block_line(l: &str) -> bool {
    let t = l.trim_start();
    t.starts_with('|') || t.starts_with('~') || t.starts_with('\\')
}

fn is_assertion_line(l: &str) -> bool {
    (l.starts_with(' ') || l.starts_with('\t')) && !l.trim().is_empty() && !is_block_line(l)
}

impl Trace {
    /// Reads and parses a trace file; `group` is its folder's name.
    pub fn load(path: &Path) -> Result<Trace, ParseError> {
        let text = std::fs::read_to_string(path).map_err(|e| ParseError {
            path: path.to_owned(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        let group = path
            .parent()
            .and_then(Path::file_name)
            .map(|g| g.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Trace::parse(path, &group, &name, &text)
    }

    /// Parses trace text.
    pub fn parse(path: &Path, group: &str, name: &str, text: &str) -> Result<Trace, ParseError> {
        let err = |line: usize, message: String| ParseError {
            path: path.to_owned(),
            line,
            message,
        };
        let mut t = Trace {
            id: format!("{group}/{name}"),
            group: group.to_owned(),
            name: name.to_owned(),
            path: path.to_owned(),
            title: String::new(),
            rule: String::new(),
            mode: Mode::Agent,
            known_failure: None,
            known_failure_on: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            config: String::new(),
            actors: Vec::new(),
            steps: Vec::new(),
        };
        let mut lines = Lines {
            lines: text.lines().collect(),
            pos: 0,
        };
        while let Some(raw) = lines.peek() {
            let n = lines.number();
            lines.pos += 1;
            let line = raw.trim_end();
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if is_block_line(line) {
                return Err(err(n, "a message line outside a `send` step".into()));
            }
            if line.starts_with(' ') || line.starts_with('\t') {
                return Err(err(n, "an indented line outside an `expect` step".into()));
            }
            // Header lines: `key: value`.
            if let Some((key, value)) = trimmed.split_once(':') {
                let key = key.trim();
                if !key.contains(' ') && t.steps.is_empty() && t.actors.is_empty() {
                    let value = value.trim().to_owned();
                    match key {
                        "title" => t.title = value,
                        "rule" => t.rule = value,
                        "target" => {
                            t.mode = match value.as_str() {
                                "agent" => Mode::Agent,
                                "plain" => Mode::Plain,
                                "backend" => Mode::Backend,
                                other => {
                                    return Err(err(
                                        n,
                                        format!(
                                        "target `{other}`: expected `agent`, `plain` or `backend`"
                                    ),
                                    ))
                                }
                            }
                        }
                        "known-failure" => t.known_failure = Some(value),
                        k if k.starts_with("known-failure(") && k.ends_with(')') => {
                            let on = &k["known-failure(".len()..k.len() - 1];
                            if on.is_empty() {
                                return Err(err(n, "`known-failure()` needs a target name".into()));
                            }
                            t.known_failure_on.push((on.to_owned(), value));
                        }
                        "timeout" => {
                            t.timeout = parse_duration(&value)
                                .ok_or_else(|| err(n, format!("bad duration `{value}`")))?;
                        }
                        "config" => {
                            if !value.is_empty() {
                                return Err(err(n, "`config:` takes `|` lines below it".into()));
                            }
                            let block = block(&mut lines).map_err(|(l, m)| err(l, m))?;
                            t.config = String::from_utf8_lossy(&block).replace("\r\n", "\n");
                        }
                        other => return Err(err(n, format!("unknown header `{other}:`"))),
                    }
                    continue;
                }
            }
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            if words[0] == "actor" {
                if !t.steps.is_empty() {
                    return Err(err(n, "actors are declared before the first step".into()));
                }
                let actor = parse_actor(&words).map_err(|m| err(n, m))?;
                if t.actors.iter().any(|a| a.name == actor.0) {
                    return Err(err(n, format!("actor `{}` declared twice", actor.0)));
                }
                t.actors.push(Actor {
                    name: actor.0,
                    kind: actor.1,
                    line: n,
                });
                continue;
            }
            let step =
                parse_step(&words, &mut lines, &t).map_err(|(l, m)| err(l.unwrap_or(n), m))?;
            t.steps.push(Located { step, line: n });
        }
        if t.title.is_empty() {
            return Err(err(0, "missing `title:` header".into()));
        }
        if t.rule.is_empty() {
            return Err(err(
                0,
                "missing `rule:` header (the RFC or design.md section checked)".into(),
            ));
        }
        if t.steps.is_empty() {
            return Err(err(0, "no steps".into()));
        }
        // The actors decide the mode as well as the header does.
        let has = |f: fn(&ActorKind) -> bool| t.actors.iter().any(|a| f(&a.kind));
        let plain = has(|k| matches!(k, ActorKind::SipServer { .. }));
        let backend = has(|k| matches!(k, ActorKind::Backend));
        let agent = has(|k| matches!(k, ActorKind::Agent { .. }));
        let declared = t.mode;
        t.mode = match (plain, backend, agent) {
            (true, false, false) => Mode::Plain,
            (false, true, false) => Mode::Backend,
            (false, false, _) => declared,
            _ => {
                return Err(err(
                    0,
                    "a trace mixes sip-server, backend and agent actors: one kind per trace".into(),
                ))
            }
        };
        if t.mode == Mode::Plain {
            // Plain traces also run against long-lived balancers: a
            // Call-ID written without the run's nonce would collide with
            // the previous run's.
            for located in &t.steps {
                let payload = match &located.step {
                    Step::Send { payload, .. } | Step::AgentSend { payload, .. } => payload,
                    _ => continue,
                };
                let Payload::Inline(bytes) = payload else {
                    continue;
                };
                let text = String::from_utf8_lossy(bytes);
                let fixed = text.split("\r\n").find(|l| {
                    let name = l.split(':').next().unwrap_or("").trim();
                    (name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i"))
                        && l.contains(':')
                        && !l.contains("${")
                });
                if let Some(line) = fixed {
                    return Err(err(
                        located.line,
                        format!(
                            "`{line}`: a plain trace writes its Call-IDs with `${{run}}` \
                             (or another variable), so re-runs against a long-lived \
                             balancer do not collide"
                        ),
                    ));
                }
            }
        }
        if declared != Mode::Agent && declared != t.mode {
            return Err(err(
                0,
                format!(
                    "`target: {declared}` but the actors make it a {} trace",
                    t.mode
                ),
            ));
        }
        Ok(t)
    }

    /// Why the trace is known to fail on the target named `target`, if it
    /// is (a mark for every target, else one for that name).
    pub fn known_failure_for(&self, target: &str) -> Option<&str> {
        self.known_failure.as_deref().or_else(|| {
            self.known_failure_on
                .iter()
                .find(|(on, _)| on == target)
                .map(|(_, why)| why.as_str())
        })
    }

    /// The actor named `name`.
    pub fn actor(&self, name: &str) -> Option<&Actor> {
        self.actors.iter().find(|a| a.name == name)
    }
}

fn parse_actor(words: &[&str]) -> Result<(String, ActorKind), String> {
    let usage = "expected `actor NAME tcp|udp IP`, `actor NAME agent [secret TEXT] [deferred]`, \
                 `actor NAME sip-server tcp|udp IP` or `actor NAME backend`";
    let name = words.get(1).ok_or(usage)?;
    if name.contains(['/', '|', '$', '{', '}']) {
        return Err(format!("actor name `{name}` may not contain / | $ {{ }}"));
    }
    let net = |w: Option<&&str>| match w.copied() {
        Some("tcp") => Ok(Net::Tcp),
        Some("udp") => Ok(Net::Udp),
        _ => Err(usage.to_owned()),
    };
    let kind = match words.get(2).copied() {
        Some("tcp" | "udp") => {
            let ip = words.get(3).ok_or(usage)?;
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| format!("`{ip}` is not an IP address"))?;
            ActorKind::Peer {
                net: net(words.get(2))?,
                ip: (*ip).to_owned(),
            }
        }
        Some("agent") => {
            let mut secret = None;
            let mut deferred = false;
            let mut i = 3;
            while let Some(w) = words.get(i) {
                match *w {
                    "secret" => {
                        secret = Some((*words.get(i + 1).ok_or(usage)?).to_owned());
                        i += 2;
                    }
                    "deferred" => {
                        deferred = true;
                        i += 1;
                    }
                    other => return Err(format!("unknown agent option `{other}`")),
                }
            }
            ActorKind::Agent { secret, deferred }
        }
        Some("backend") => ActorKind::Backend,
        Some("sip-server") => {
            let ip = words.get(4).ok_or(usage)?;
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| format!("`{ip}` is not an IP address"))?;
            ActorKind::SipServer {
                net: net(words.get(3))?,
                ip: (*ip).to_owned(),
            }
        }
        _ => return Err(usage.into()),
    };
    Ok(((*name).to_owned(), kind))
}

/// Reads the message block below a step: `|`, `~` and `\` lines.
fn block(lines: &mut Lines<'_>) -> Result<Vec<u8>, (usize, String)> {
    let mut out = Vec::new();
    let mut any = false;
    while let Some(raw) = lines.peek() {
        if !is_block_line(raw) {
            break;
        }
        let n = lines.number();
        lines.pos += 1;
        any = true;
        let t = raw.trim_start();
        let (marker, rest) = t.split_at(1);
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        match marker {
            "|" => {
                out.extend_from_slice(rest.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            "~" => out.extend_from_slice(rest.as_bytes()),
            _ => out.extend(unescape(rest).map_err(|m| (n, m))?),
        }
    }
    if !any {
        return Err((
            lines.number(),
            "expected a message block (`|` lines)".into(),
        ));
    }
    Ok(out)
}

fn assertions(lines: &mut Lines<'_>) -> Result<Vec<Assertion>, (usize, String)> {
    let mut out = Vec::new();
    while let Some(raw) = lines.peek() {
        if raw.trim().starts_with('#') && (raw.starts_with(' ') || raw.starts_with('\t')) {
            lines.pos += 1;
            continue;
        }
        if !is_assertion_line(raw) {
            break;
        }
        let n = lines.number();
        lines.pos += 1;
        let text = raw.trim();
        let (selector, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        let rest = rest.trim_start();
        let (op, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let value = value.trim().to_owned();
        let need = |v: String| {
            if v.is_empty() {
                Err((n, format!("`{op}` needs a value")))
            } else {
                Ok(v)
            }
        };
        let op = match op {
            "=" => Op::Eq(value),
            "!=" => Op::Ne(value),
            "~" => Op::Matches(need(value)?),
            "!~" => Op::NotMatches(need(value)?),
            "contains" => Op::Contains(need(value)?),
            "->" => Op::Capture(need(value)?),
            "absent" => Op::Absent,
            "present" => Op::Present,
            other => {
                return Err((
                    n,
                    format!(
                        "unknown operator `{other}` (=, !=, ~, !~, contains, ->, absent, present)"
                    ),
                ))
            }
        };
        if let Op::Matches(re) | Op::NotMatches(re) = &op {
            if !re.contains("${") {
                regex::Regex::new(re).map_err(|e| (n, format!("bad regex: {e}")))?;
            }
        }
        out.push(Assertion {
            selector: selector.to_owned(),
            op,
            line: n,
            text: text.to_owned(),
        });
    }
    Ok(out)
}

fn payload(
    words: &[&str],
    at: usize,
    lines: &mut Lines<'_>,
) -> Result<(Payload, Option<usize>), (Option<usize>, String)> {
    let mut split = None;
    let mut file = None;
    let mut i = at;
    while let Some(w) = words.get(i) {
        match *w {
            "split" => {
                let v = words
                    .get(i + 1)
                    .ok_or((None, "`split` needs a size".into()))?;
                split = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|&s| s > 0)
                        .ok_or((None, format!("bad split size `{v}`")))?,
                );
                i += 2;
            }
            "file" => {
                let v = words
                    .get(i + 1)
                    .ok_or((None, "`file` needs a path".into()))?;
                file = Some(PathBuf::from(v));
                i += 2;
            }
            other => return Err((None, format!("unexpected `{other}`"))),
        }
    }
    let payload = match file {
        Some(f) => Payload::File(f),
        None => Payload::Inline(block(lines).map_err(|(l, m)| (Some(l), m))?),
    };
    Ok((payload, split))
}

fn duration_arg(w: Option<&&str>) -> Result<Duration, (Option<usize>, String)> {
    let v = w.ok_or((None, "missing duration".into()))?;
    parse_duration(v).ok_or((None, format!("bad duration `{v}`")))
}

fn parse_step(
    words: &[&str],
    lines: &mut Lines<'_>,
    t: &Trace,
) -> Result<Step, (Option<usize>, String)> {
    let plain = |m: &str| (None, m.to_owned());
    let arg = |i: usize, what: &str| {
        words
            .get(i)
            .map(|s| (*s).to_owned())
            .ok_or_else(|| plain(&format!("`{}` needs {what}", words[0])))
    };
    let is_agent = |name: &str| {
        matches!(
            t.actor(name).map(|a| &a.kind),
            Some(ActorKind::Agent { .. })
        )
    };
    Ok(match words[0] {
        "connect" => {
            let at = Endpoint::parse(&arg(1, "`actor/conn`")?);
            if at.conn.is_none() {
                return Err(plain("`connect` needs `actor/conn` (name the connection)"));
            }
            Step::Connect { at }
        }
        "send" => {
            let from = arg(1, "an actor")?;
            if is_agent(&from) {
                // send AGENT TRANSPORT to ADDR [conn ID]
                let transport = arg(2, "a transport")?;
                if words.get(3) != Some(&"to") {
                    return Err(plain(
                        "an agent sends with `send AGENT TRANSPORT to IP:PORT [conn ID]`",
                    ));
                }
                let to = arg(4, "an address")?;
                let (conn, rest) = if words.get(5) == Some(&"conn") {
                    (Some(arg(6, "a connection id")?), 7)
                } else {
                    (None, 5)
                };
                let (payload, _) = payload(words, rest, lines)?;
                Step::AgentSend {
                    agent: from,
                    addressing: Addressing::Explicit {
                        transport,
                        to,
                        conn,
                    },
                    payload,
                }
            } else {
                let from = Endpoint::parse(&from);
                let (payload, split) = payload(words, 2, lines)?;
                Step::Send {
                    from,
                    payload,
                    split,
                }
            }
        }
        "reply" => {
            let agent = arg(1, "an agent")?;
            let request = arg(2, "a saved request")?;
            let (payload, _) = payload(words, 3, lines)?;
            Step::AgentSend {
                agent,
                addressing: Addressing::ReplyTo(request),
                payload,
            }
        }
        "request" => {
            let agent = arg(1, "an agent")?;
            let (payload, _) = payload(words, 2, lines)?;
            Step::AgentSend {
                agent,
                addressing: Addressing::Request,
                payload,
            }
        }
        "expect" => {
            let label = arg(1, "a target")?;
            let targets = label.split('|').map(Endpoint::parse).collect();
            let mut kind = ExpectKind::Sip;
            let mut within = None;
            let mut who = None;
            let mut save = None;
            let mut final_only = false;
            let mut i = 2;
            while let Some(w) = words.get(i) {
                match *w {
                    "pong" => kind = ExpectKind::Pong,
                    "closed" => kind = ExpectKind::Closed,
                    "refused" => kind = ExpectKind::Refused,
                    "final" => final_only = true,
                    "within" => {
                        within = Some(duration_arg(words.get(i + 1))?);
                        i += 1;
                    }
                    "->" => {
                        who = Some(arg(i + 1, "a variable after `->`")?);
                        i += 1;
                    }
                    "as" => {
                        save = Some(arg(i + 1, "a name after `as`")?);
                        i += 1;
                    }
                    other => return Err(plain(&format!("unexpected `{other}` in `expect`"))),
                }
                i += 1;
            }
            let assertions = assertions(lines).map_err(|(l, m)| (Some(l), m))?;
            if kind != ExpectKind::Sip && !assertions.is_empty() {
                return Err(plain("only a SIP message takes assertions"));
            }
            Step::Expect {
                targets,
                label,
                kind,
                within,
                who,
                save,
                final_only,
                assertions,
            }
        }
        "quiet" => {
            let mut targets = Vec::new();
            let mut within = None;
            let mut i = 1;
            while let Some(w) = words.get(i) {
                if *w == "for" {
                    within = Some(duration_arg(words.get(i + 1))?);
                    i += 2;
                    continue;
                }
                targets.push(Endpoint::parse(w));
                i += 1;
            }
            if targets.is_empty() {
                return Err(plain("`quiet` needs at least one actor"));
            }
            Step::Quiet { targets, within }
        }
        "close" => Step::Close {
            at: Endpoint::parse(&arg(1, "`actor/conn`")?),
        },
        "kill" => Step::Kill {
            agent: arg(1, "an agent")?,
        },
        "start" => Step::Start {
            agent: arg(1, "an agent")?,
        },
        "drain" => Step::Drain {
            agent: arg(1, "an agent")?,
            draining: true,
        },
        "undrain" => Step::Drain {
            agent: arg(1, "an agent")?,
            draining: false,
        },
        "wait" => Step::Wait(duration_arg(words.get(1))?),
        "set" => {
            let name = arg(1, "a name")?;
            if words.get(2) != Some(&"=") {
                return Err(plain("expected `set NAME = VALUE`"));
            }
            Step::Set {
                name,
                value: words[3..].join(" "),
            }
        }
        other => return Err(plain(&format!("unknown step `{other}`"))),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T: &str = "\
title: a call
rule: RFC 3261 §18.2.2
# a comment
config:
  | [routing]
  | new_call_lifetime_ms = 1000
actor a tcp 127.0.0.72
actor b1 agent

connect a/c1
send a/c1
  | INVITE sip:x@${lb} SIP/2.0
  | Content-Length: 0
  |
expect b1 -> backend as inv
  start = INVITE sip:x@${lb} SIP/2.0
  X-Viaduct-Backend -> tag
  Via.received absent
reply ${backend} inv
  ~ SIP/2.0 200 OK
  \\ \\r\\nContent-Length: 0\\r\\n\\r\\n
wait 100ms
";

    #[test]
    fn parses_a_trace() {
        let t = Trace::parse(Path::new("x.trace"), "g", "x", T).unwrap();
        assert_eq!(t.config, "[routing]\nnew_call_lifetime_ms = 1000\n");
        assert_eq!(t.actors.len(), 2);
        assert_eq!(t.steps.len(), 5);
        let Step::Send { payload, .. } = &t.steps[1].step else {
            panic!()
        };
        assert_eq!(
            payload,
            &Payload::Inline(b"INVITE sip:x@${lb} SIP/2.0\r\nContent-Length: 0\r\n\r\n".to_vec())
        );
        let Step::Expect {
            assertions,
            who,
            save,
            ..
        } = &t.steps[2].step
        else {
            panic!()
        };
        assert_eq!(who.as_deref(), Some("backend"));
        assert_eq!(save.as_deref(), Some("inv"));
        assert_eq!(assertions[1].op, Op::Capture("tag".into()));
        assert_eq!(assertions[2].op, Op::Absent);
        let Step::AgentSend { payload, .. } = &t.steps[3].step else {
            panic!()
        };
        assert_eq!(
            payload,
            &Payload::Inline(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec())
        );
    }

    #[test]
    fn errors_name_the_line() {
        let bad = T.replace("wait 100ms", "wiat 100ms");
        let e = Trace::parse(Path::new("x.trace"), "g", "x", &bad).unwrap_err();
        assert_eq!(e.to_string(), "x.trace:22: unknown step `wiat`");
        let bad = T.replace("  Via.received absent", "  Via.received is 3");
        let e = Trace::parse(Path::new("x.trace"), "g", "x", &bad).unwrap_err();
        assert_eq!(e.line, 18);
    }

    #[test]
    fn modes_and_known_failures() {
        let plain = "title: t\nrule: r\nknown-failure(kamailio): RFC 3261 §16.3\n\
                     actor ua udp 127.0.0.71\nactor s1 sip-server udp 127.0.0.61\n\
                     expect s1 final\n  method = INVITE\n";
        let t = Trace::parse(Path::new("p.trace"), "g", "p", plain).unwrap();
        assert_eq!(t.mode, Mode::Plain);
        assert_eq!(t.known_failure_for("kamailio"), Some("RFC 3261 §16.3"));
        assert_eq!(t.known_failure_for("viaduct-sip"), None);
        let Step::Expect { final_only, .. } = &t.steps[0].step else {
            panic!()
        };
        assert!(final_only);
        let backend = "title: t\nrule: r\nactor app backend\nwait 1ms\n";
        let t = Trace::parse(Path::new("b.trace"), "g", "b", backend).unwrap();
        assert_eq!(t.mode, Mode::Backend);
        let mixed = "title: t\nrule: r\nactor app backend\nactor b1 agent\nwait 1ms\n";
        let e = Trace::parse(Path::new("m.trace"), "g", "m", mixed).unwrap_err();
        assert!(e.message.contains("one kind per trace"), "{e}");
        let wrong = "title: t\nrule: r\ntarget: backend\nactor s1 sip-server udp 127.0.0.61\n\
                     wait 1ms\n";
        let e = Trace::parse(Path::new("w.trace"), "g", "w", wrong).unwrap_err();
        assert!(e.message.contains("`target: backend`"), "{e}");
        let fixed =
            "title: t\nrule: r\nactor ua udp 127.0.0.71\nactor s1 sip-server udp 127.0.0.61\n\
                     send ua\n  | OPTIONS sip:x@y SIP/2.0\n  | Call-ID: fixed@x\n  |\n";
        let e = Trace::parse(Path::new("f.trace"), "g", "f", fixed).unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("${run}"), "{e}");
        let ok = fixed.replace("fixed@x", "f-${run}@x");
        assert!(Trace::parse(Path::new("f.trace"), "g", "f", &ok).is_ok());
        let bad_ip = "title: t\nrule: r\nactor s1 sip-server udp nowhere\nwait 1ms\n";
        let e = Trace::parse(Path::new("i.trace"), "g", "i", bad_ip).unwrap_err();
        assert_eq!(e.line, 3);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            unescape("a\\r\\n\\x00\\$").unwrap(),
            b"a\r\n\x00\\$".to_vec()
        );
        assert!(unescape("\\q").is_err());
    }
}
