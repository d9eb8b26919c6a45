//! The README cannot drift from the config types: every `toml` block of it
//! (and the example deployment config) parses with the balancer's own
//! `Config::from_toml` (unknown keys rejected, semantic checks run), and
//! the block under "Configuration reference" is exactly the default
//! configuration and names every field the balancer knows.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use balancer::config::Config;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// The `toml` fenced blocks of `text`, with the line each starts on.
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed == "```toml" => current = Some((n + 1, String::new())),
            Some(_) if trimmed == "```" => out.extend(current.take()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

/// `section.key` for every key of a TOML text, commented-out ones included
/// (`# key = value` lines of the reference document optional fields).
fn keys(text: &str, with_comments: bool) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut l = line.trim();
        if with_comments {
            l = l.trim_start_matches('#').trim();
        }
        if let Some(s) = l.strip_prefix("[[").and_then(|s| s.split("]]").next()) {
            section = s.trim().to_owned();
        } else if let Some(s) = l.strip_prefix('[').and_then(|s| s.split(']').next()) {
            section = s.trim().to_owned();
        } else if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && !k.starts_with('"')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                out.insert(format!("{section}.{k}"));
            }
        }
    }
    out
}

#[test]
fn every_toml_block_of_the_readme_is_a_valid_config() {
    let blocks = toml_blocks(&readme());
    assert!(blocks.len() >= 4, "found only {} toml blocks", blocks.len());
    for (line, block) in &blocks {
        if let Err(e) = Config::from_toml(block) {
            panic!("README.md line {line}: the toml block does not parse:\n{e}\n{block}");
        }
    }
}

#[test]
fn the_example_deployment_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../balancer/deploy/viaduct.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    if let Err(e) = Config::from_toml(&text) {
        panic!("{}: {e}", path.display());
    }
}

#[test]
fn the_config_reference_is_the_default_and_names_every_field() {
    let text = readme();
    let start = text
        .find("## Configuration reference")
        .expect("README has a Configuration reference section");
    let (_, reference) = toml_blocks(&text[start..])
        .into_iter()
        .next()
        .expect("a toml block in the Configuration reference");
    let parsed = Config::from_toml(&reference).unwrap();
    assert_eq!(
        parsed,
        Config::default(),
        "the reference's values are not the defaults"
    );
    // Every field the balancer would print, plus the optional ones (they
    // are documented commented out).
    let mut known = keys(&Config::default().to_toml(), false);
    for optional in [
        "sip.listen.public_address",
        "agents.secret_file",
        "agents.previous_secret_file",
        "admin.token_file",
    ] {
        known.insert(optional.to_owned());
    }
    let documented = keys(&reference, true);
    let missing: Vec<&String> = known.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "fields missing from the README's config reference: {missing:?}"
    );
    let unknown: Vec<&String> = documented.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "the README's config reference names fields the balancer does not have: {unknown:?}"
    );
    // And each optional one is accepted where the reference puts it.
    let uncommented: String = reference
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("# public_address")
                || t.starts_with("# secret_file")
                || t.starts_with("# previous_secret_file")
                || t.starts_with("# token_file")
            {
                t.trim_start_matches("# ").to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let with_optional = Config::from_toml(&uncommented).unwrap();
    assert!(with_optional.sip.listen[0].public_address.is_some());
    assert!(with_optional.agents.secret_file.is_some());
    assert!(with_optional.agents.previous_secret_file.is_some());
    assert!(with_optional.admin.token_file.is_some());
}
