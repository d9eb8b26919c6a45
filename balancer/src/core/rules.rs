//! Content rules: which pool a new call's initial request goes to.
//!
//! A rule holds up to four conditions, all of which must hold:
//! the method, the Request-URI user, the Request-URI host, one header's
//! value. Text conditions are `exact`, `prefix` or `regex` (exactly one of
//! the three). Rules are checked in order and the first that matches names
//! the pool; when none matches, the default pool takes the call.
//!
//! * method: compared ignoring ASCII case;
//! * Request-URI user: compared as written (SIP users are case-sensitive);
//!   a URI without a user part matches no user condition;
//! * Request-URI host: ignoring ASCII case (regexes are compiled
//!   case-insensitive for it);
//! * header: the condition holds if any line of that header (compact forms
//!   included) matches; the value is the whole field value, trimmed.
//!
//! Regexes are `regex::bytes` syntax, unanchored: write `^…$` to anchor.
//! They are compiled once, when the configuration is loaded; an error names
//! the rule's index and field (`rules[2].ruri_user.regex`).

use encap_proto::sip::SipMessage;
use regex::bytes::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use super::select::PoolId;

/// A text condition as written in the configuration: exactly one of the
/// three forms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TextMatchSpec {
    /// The whole text equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The text starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The text matches this regex somewhere (unanchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A header condition as written in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    /// The header's name (any case; compact forms are found too).
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The value matches this regex somewhere (unanchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// One `[[rules]]` entry as written in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The pool a matching request goes to. Required.
    pub pool: String,
    /// The request method, e.g. `"SUBSCRIBE"` (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A condition on the Request-URI user part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ruri_user: Option<TextMatchSpec>,
    /// A condition on the Request-URI host (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ruri_host: Option<TextMatchSpec>,
    /// A condition on a header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatchSpec>,
}

/// A compiled text condition.
#[derive(Debug, Clone)]
enum TextMatch {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    Regex(Regex),
}

impl TextMatch {
    fn compile(
        path: &str,
        exact: Option<&String>,
        prefix: Option<&String>,
        regex: Option<&String>,
        case_insensitive: bool,
        problems: &mut Vec<(String, String)>,
    ) -> Option<TextMatch> {
        let fold = |s: &String| {
            if case_insensitive {
                s.to_ascii_lowercase().into_bytes()
            } else {
                s.clone().into_bytes()
            }
        };
        match (exact, prefix, regex) {
            (Some(e), None, None) => Some(TextMatch::Exact(fold(e))),
            (None, Some(p), None) => Some(TextMatch::Prefix(fold(p))),
            (None, None, Some(r)) => match RegexBuilder::new(r)
                .case_insensitive(case_insensitive)
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) => Some(TextMatch::Regex(re)),
                Err(e) => {
                    problems.push((format!("{path}.regex"), format!("not a regex: {e}")));
                    None
                }
            },
            _ => {
                problems.push((
                    path.to_owned(),
                    "give exactly one of `exact`, `prefix`, `regex`".to_owned(),
                ));
                None
            }
        }
    }

    fn matches(&self, text: &[u8], case_insensitive: bool) -> bool {
        match self {
            TextMatch::Exact(e) if case_insensitive => text.eq_ignore_ascii_case(e),
            TextMatch::Exact(e) => text == e.as_slice(),
            TextMatch::Prefix(p) if case_insensitive => text
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            TextMatch::Prefix(p) => text.starts_with(p),
            TextMatch::Regex(re) => re.is_match(text),
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    method: Option<Vec<u8>>,
    ruri_user: Option<TextMatch>,
    ruri_host: Option<TextMatch>,
    header: Option<(String, TextMatch)>,
    pool: PoolId,
}

impl Rule {
    fn matches(&self, msg: &SipMessage) -> bool {
        if let Some(m) = &self.method {
            if !msg.method().is_some_and(|got| got.eq_ignore_ascii_case(m)) {
                return false;
            }
        }
        if self.ruri_user.is_some() || self.ruri_host.is_some() {
            let Some(uri) = msg.request_uri() else {
                return false;
            };
            if let Some(cond) = &self.ruri_user {
                if !uri.user.is_some_and(|u| cond.matches(u, false)) {
                    return false;
                }
            }
            if let Some(cond) = &self.ruri_host {
                if !cond.matches(uri.host, true) {
                    return false;
                }
            }
        }
        if let Some((name, cond)) = &self.header {
            if !msg
                .headers(name)
                .any(|v| cond.matches(v.trim_ascii(), false))
            {
                return false;
            }
        }
        true
    }
}

/// The compiled rules, in order.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Compiles `specs`; `pool_id` resolves a pool name. Every problem is
    /// reported at once, each with its path (`rules[i].field`).
    pub fn compile(
        specs: &[RuleSpec],
        pool_id: impl Fn(&str) -> Option<PoolId>,
    ) -> Result<Rules, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut rules = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let path = format!("rules[{i}]");
            let pool = pool_id(&spec.pool);
            if pool.is_none() {
                problems.push((
                    format!("{path}.pool"),
                    format!("no pool is named {:?}", spec.pool),
                ));
            }
            if spec.method.is_none()
                && spec.ruri_user.is_none()
                && spec.ruri_host.is_none()
                && spec.header.is_none()
            {
                problems.push((
                    path.clone(),
                    "a rule needs at least one of `method`, `ruri_user`, `ruri_host`, `header` (calls no rule matches go to routing.default_pool)".to_owned(),
                ));
            }
            if spec
                .method
                .as_ref()
                .is_some_and(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_graphic()))
            {
                problems.push((
                    format!("{path}.method"),
                    "not a SIP method token".to_owned(),
                ));
            }
            let text = |field: &str, s: &Option<TextMatchSpec>, ci, problems: &mut Vec<_>| {
                s.as_ref().and_then(|s| {
                    TextMatch::compile(
                        &format!("{path}.{field}"),
                        s.exact.as_ref(),
                        s.prefix.as_ref(),
                        s.regex.as_ref(),
                        ci,
                        problems,
                    )
                })
            };
            let ruri_user = text("ruri_user", &spec.ruri_user, false, &mut problems);
            let ruri_host = text("ruri_host", &spec.ruri_host, true, &mut problems);
            let header = spec.header.as_ref().and_then(|h| {
                if h.name.is_empty() || !h.name.bytes().all(|b| b.is_ascii_graphic()) {
                    problems.push((
                        format!("{path}.header.name"),
                        "not a header name".to_owned(),
                    ));
                }
                TextMatch::compile(
                    &format!("{path}.header"),
                    h.exact.as_ref(),
                    h.prefix.as_ref(),
                    h.regex.as_ref(),
                    false,
                    &mut problems,
                )
                .map(|m| (h.name.clone(), m))
            });
            if let Some(pool) = pool {
                rules.push(Rule {
                    method: spec.method.as_ref().map(|m| m.clone().into_bytes()),
                    ruri_user,
                    ruri_host,
                    header,
                    pool,
                });
            }
        }
        if problems.is_empty() {
            Ok(Rules { rules })
        } else {
            Err(problems)
        }
    }

    /// The pool of the first rule `msg` matches, if any.
    pub fn pool_for(&self, msg: &SipMessage) -> Option<PoolId> {
        self.rules.iter().find(|r| r.matches(msg)).map(|r| r.pool)
    }

    /// Whether there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}
