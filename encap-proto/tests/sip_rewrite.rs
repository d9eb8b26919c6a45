//! Rewrites: snapshots of the rewritten text (branches, tags and Call-IDs
//! redacted), re-scans of the result, and checks that untouched bytes are
//! kept byte for byte.

// Test helpers too: a panic here is a test failure with its message.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use encap_proto::sip::{Rewrite, SipMessage, UriTarget};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/corpus");

fn corpus(rel: &str) -> SipMessage {
    let b = std::fs::read(format!("{CORPUS}/{rel}")).unwrap();
    SipMessage::parse(Bytes::from(b)).unwrap()
}

fn parse(s: &str) -> SipMessage {
    SipMessage::parse(Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

/// Text with CRLF shown as `\r` + newline, and branch/tag/Call-ID values redacted.
fn render(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b).replace("\r\n", "\\r\n");
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("call-id:") || lower.starts_with("i:") {
            let colon = line.find(':').unwrap();
            out.push_str(&line[..=colon]);
            out.push_str(" [call-id]\\r\n");
            continue;
        }
        let mut rest = line;
        while let Some(i) = ["branch=", "tag="]
            .iter()
            .filter_map(|k| rest.find(k).map(|i| i + k.len()))
            .min()
        {
            out.push_str(&rest[..i]);
            let end = rest[i..]
                .find([';', ',', '>', ' ', '\\'])
                .map_or(rest.len(), |e| i + e);
            out.push_str("[redacted]");
            rest = &rest[end..];
        }
        out.push_str(rest);
    }
    out
}

/// Every line of `orig` that does not contain one of `touched` appears
/// unchanged, in order, in `out`; and the body is identical.
fn assert_untouched_kept(orig: &SipMessage, out: &[u8], touched: &[&str]) {
    let body = orig.body();
    assert!(out.ends_with(body), "body changed");
    let head_len = orig.bytes().len() - body.len();
    let lines = orig.bytes()[..head_len].split_inclusive(|&b| b == b'\n');
    let mut hay = out;
    for line in lines {
        let text = String::from_utf8_lossy(line);
        if touched
            .iter()
            .any(|t| text.to_ascii_lowercase().contains(t))
        {
            continue;
        }
        let pos = hay
            .windows(line.len())
            .position(|w| w == line)
            .unwrap_or_else(|| panic!("line {text:?} not kept byte for byte"));
        hay = &hay[pos + line.len()..];
    }
}

const INVITE: &str = "INVITE sip:bob@biloxi.example.com;transport=udp SIP/2.0\r\n\
v: SIP/2.0/UDP pc33.atlanta.example.com;rport;branch=z9hG4bK776asdhds\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060\r\n ;branch=z9hG4bKold\r\n\
Route: <sip:lb.example.com;lr>, <sip:p2.example.com;lr>\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
f: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
i: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
m: <sip:alice@pc33.atlanta.example.com>\r\n\
Content-Type: application/sdp\r\n\
l: 10\r\n\r\nv=0\r\ns=-\r\n";

#[test]
fn load_balancer_request_path() {
    let m = parse(INVITE);
    let out = Rewrite::new(&m)
        .insert_header("Via", b"SIP/2.0/TCP lb.example.com:5060;branch=z9hG4bKlb1")
        .set_top_via_param("rport", Some(b"5062"))
        .set_top_via_param("received", Some(b"192.0.2.9"))
        .remove_headers("route")
        .finish();
    insta::assert_snapshot!("lb_request_path", render(&out));

    let r = SipMessage::parse(out.clone()).unwrap();
    let vias: Vec<_> = r.vias().collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[0].host, b"lb.example.com");
    assert_eq!(vias[0].branch, Some(&b"z9hG4bKlb1"[..]));
    assert_eq!(vias[1].rport, Some(Some(5062)));
    assert_eq!(vias[1].received, Some(&b"192.0.2.9"[..]));
    assert_eq!(vias[1].branch, m.top_via().unwrap().branch);
    assert!(r.top_route().is_none() && r.header("Route").is_none());
    assert_eq!(r.call_id(), m.call_id());
    assert_eq!(r.body(), m.body());
    let inserted = "Via: SIP/2.0/TCP lb.example.com:5060;branch=z9hG4bKlb1\r\n".len();
    let removed = "Route: <sip:lb.example.com;lr>, <sip:p2.example.com;lr>\r\n".len();
    let params = "=5062;received=192.0.2.9".len();
    assert_eq!(out.len(), m.bytes().len() + inserted - removed + params);
    assert_untouched_kept(&m, &out, &["rport", "route"]);
}

#[test]
fn uri_params_replace_append_and_bracket() {
    let m = parse(INVITE);
    let out = Rewrite::new(&m)
        .set_uri_param(UriTarget::RequestUri, "transport", Some(b"tcp"))
        .set_uri_param(UriTarget::TopRoute, "lr", None)
        .set_uri_param(UriTarget::TopRoute, "x-lb", Some(b"1"))
        .set_uri_param(UriTarget::Contact, "ob", None)
        .finish();
    insta::assert_snapshot!("uri_params", render(&out));
    let r = SipMessage::parse(out.clone()).unwrap();
    assert_eq!(
        r.request_uri().unwrap().param("transport"),
        Some(Some(&b"tcp"[..]))
    );
    let route = r.top_route().unwrap();
    assert_eq!(route.uri.param("lr"), Some(None));
    assert_eq!(route.uri.param("x-lb"), Some(Some(&b"1"[..])));
    assert_eq!(r.contact().unwrap().uri.param("ob"), Some(None));
    assert_untouched_kept(&m, &out, &["invite sip:", "route:", "m: "]);

    // cparam01: an addr-spec Contact gets <> so the new param is a URI param,
    // and the existing ;unknownparam stays a header param.
    let m = corpus("rfc4475/valid/cparam01.sip");
    let out = Rewrite::new(&m)
        .set_uri_param(UriTarget::Contact, "gr", Some(b"x"))
        .finish();
    insta::assert_snapshot!("cparam01_contact", render(&out));
    let r = SipMessage::parse(out.clone()).unwrap();
    let c = r.contact().unwrap();
    assert_eq!(c.uri.param("gr"), Some(Some(&b"x"[..])));
    assert_eq!(c.param("unknownparam"), Some(None));
    assert_eq!(c.uri.param("unknownparam"), None);
    assert_untouched_kept(&m, &out, &["contact:"]);
}

#[test]
fn remove_compact_and_folded_instances() {
    // wsinv: `Via  :` folded over three lines and `v:` folded over four.
    let m = corpus("rfc4475/valid/wsinv.sip");
    let out = Rewrite::new(&m)
        .remove_headers("Via")
        .remove_headers("newfangledheader")
        .insert_header("Via", b"SIP/2.0/UDP lb.example.com;branch=z9hG4bKnew")
        .finish();
    insta::assert_snapshot!("wsinv_vias_replaced", render(&out));
    let r = SipMessage::parse(out.clone()).unwrap();
    assert_eq!(r.vias().count(), 1);
    assert_eq!(r.top_via().unwrap().host, b"lb.example.com");
    assert!(r.header("NewFangledHeader").is_none());
    assert_eq!(r.body(), m.body());
    assert_eq!(r.content_length(), Some(150));
    assert_eq!(r.call_id(), m.call_id());
}

#[test]
fn edits_inside_removed_headers_are_dropped() {
    let m = parse(INVITE);
    // "v" is the compact form of Via: both Via lines go, with the rport edit.
    let out = Rewrite::new(&m)
        .set_top_via_param("rport", Some(b"1"))
        .remove_headers("v")
        .finish();
    let r = SipMessage::parse(out.clone()).unwrap();
    assert_eq!(r.vias().count(), 0);
    assert!(!out.windows(5).any(|w| w == b"rport"));
    assert_untouched_kept(&m, &out, &["via", "v:", "branch"]);
}

#[test]
fn uri_hostport_replaced_keeping_user_params_headers() {
    let m = parse(INVITE);
    let out = Rewrite::new(&m)
        .set_uri_hostport(UriTarget::Contact, "203.0.113.7", Some(5070))
        .set_uri_hostport(UriTarget::RequestUri, "2001:db8::5", None)
        .set_uri_hostport(UriTarget::TopRoute, "[2001:db8::6]", Some(5061))
        .finish();
    insta::assert_snapshot!("uri_hostport", render(&out));
    let r = SipMessage::parse(out.clone()).unwrap();
    r.validate().unwrap();
    let c = r.contact().unwrap();
    assert_eq!(
        (c.uri.user, c.uri.host, c.uri.port),
        (Some(&b"alice"[..]), &b"203.0.113.7"[..], Some(5070))
    );
    let u = r.request_uri().unwrap();
    assert_eq!((u.host, u.port), (&b"[2001:db8::5]"[..], None));
    assert_eq!(u.param("transport"), Some(Some(&b"udp"[..])));
    let route = r.top_route().unwrap();
    assert_eq!(
        (route.uri.host, route.uri.port),
        (&b"[2001:db8::6]"[..], Some(5061))
    );
    assert_eq!(route.uri.param("lr"), Some(None));
    assert_untouched_kept(&m, &out, &["invite sip:", "route:", "m: "]);

    // A port is replaced or dropped; user, params and headers stay.
    let m = parse("OPTIONS sip:u:pw@old.example.com:5060;lr?subject=x SIP/2.0\r\nl: 0\r\n\r\n");
    let out = Rewrite::new(&m)
        .set_uri_hostport(UriTarget::RequestUri, "new.example.com", None)
        .finish();
    assert_eq!(
        &out[..],
        &b"OPTIONS sip:u:pw@new.example.com;lr?subject=x SIP/2.0\r\nl: 0\r\n\r\n"[..]
    );
    // Invalid hosts and missing targets are skipped, not applied.
    let mut rw = Rewrite::new(&m);
    rw.set_uri_hostport(UriTarget::RequestUri, "a b", None)
        .set_uri_hostport(UriTarget::RequestUri, "", Some(1))
        .set_uri_hostport(UriTarget::RequestUri, "h>", Some(1))
        .set_uri_hostport(UriTarget::Contact, "h", None);
    assert_eq!(rw.skipped(), 4);
    assert_eq!(rw.finish(), *m.bytes());
}

#[test]
fn viaduct_headers_found_by_the_scan_and_removed_by_prefix() {
    let m = parse(INVITE);
    assert!(!m.has_viaduct_headers());
    assert_eq!(m.header("X-Viaduct-Backend"), None);
    let raw = INVITE.replace(
        "Max-Forwards: 70\r\n",
        "X-Viaduct-Backend: b1\r\nMax-Forwards: 70\r\nx-viaduct-failover: 1;\r\n\tfolded\r\n",
    );
    let m = parse(&raw);
    assert!(m.has_viaduct_headers());
    assert_eq!(m.header("x-viaduct-backend"), Some(&b"b1"[..]));
    assert_eq!(m.header("X-Viaduct-Failover"), Some(&b"1;\r\n\tfolded"[..]));
    let out = Rewrite::new(&m)
        .remove_headers_with_prefix("X-VIADUCT-")
        .finish();
    assert_eq!(&out[..], INVITE.as_bytes());
    let r = SipMessage::parse(out).unwrap();
    assert!(!r.has_viaduct_headers());
}
