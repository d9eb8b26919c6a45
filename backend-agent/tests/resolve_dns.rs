//! Next-hop names resolved through a local DNS server (a fixture on a
//! 127.0.0.x address of its own; nothing reaches the internet): SRV first
//! when no port is given (RFC 3263 §5), A/AAAA with the port when it is,
//! default ports when no SRV exists.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests: unwrap fails the test

use std::net::{Ipv4Addr, SocketAddr};

use backend_agent::resolve::Resolver;
use backend_agent::route::NextHop;
use encap_proto::frame::Transport;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};

/// Answers: `_sip._udp.srv.test.` SRV -> 10 60 5070 host-a.test. and
/// 20 0 5080 host-b.test.; `host-a.test.` A 127.0.0.201; `plain.test.`
/// A 127.0.0.202; anything else NXDOMAIN.
async fn dns_fixture(ip: &str) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_bytes(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new();
            resp.set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true);
            let mut found = false;
            for q in query.queries() {
                resp.add_query(q.clone());
                let name = q.name().to_ascii().to_lowercase();
                let answer = match (q.query_type(), name.as_str()) {
                    (RecordType::SRV, "_sip._udp.srv.test.") => vec![
                        RData::SRV(SRV::new(
                            20,
                            0,
                            5080,
                            Name::from_ascii("host-b.test.").unwrap(),
                        )),
                        RData::SRV(SRV::new(
                            10,
                            60,
                            5070,
                            Name::from_ascii("host-a.test.").unwrap(),
                        )),
                    ],
                    (RecordType::A, "host-a.test.") => {
                        vec![RData::A(A(Ipv4Addr::new(127, 0, 0, 201)))]
                    }
                    (RecordType::A, "plain.test.") => {
                        vec![RData::A(A(Ipv4Addr::new(127, 0, 0, 202)))]
                    }
                    _ => vec![],
                };
                for rdata in answer {
                    found = true;
                    resp.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                }
            }
            if !found {
                resp.set_response_code(ResponseCode::NXDomain);
            }
            let _ = socket.send_to(&resp.to_bytes().unwrap(), from).await;
        }
    });
    addr
}

fn name(transport: Transport, host: &str, port: Option<u16>) -> NextHop {
    NextHop::Resolve {
        transport,
        host: host.to_owned(),
        port,
    }
}

#[tokio::test]
async fn srv_then_a_with_the_srv_port() {
    let dns = dns_fixture("127.0.0.200").await;
    let r = Resolver::with_name_servers(&[dns]);
    let got = r
        .resolve(&name(Transport::Udp, "srv.test", None))
        .await
        .unwrap();
    assert_eq!(
        got,
        (Transport::Udp, "127.0.0.201:5070".parse().unwrap()),
        "lowest priority target"
    );
}

#[tokio::test]
async fn a_port_in_the_message_skips_srv_and_no_srv_means_the_default_port() {
    let dns = dns_fixture("127.0.0.203").await;
    let r = Resolver::with_name_servers(&[dns]);
    let got = r
        .resolve(&name(Transport::Tcp, "plain.test", Some(5090)))
        .await
        .unwrap();
    assert_eq!(got, (Transport::Tcp, "127.0.0.202:5090".parse().unwrap()));
    let got = r
        .resolve(&name(Transport::Tls, "plain.test", None))
        .await
        .unwrap();
    assert_eq!(got, (Transport::Tls, "127.0.0.202:5061".parse().unwrap()));
}

#[tokio::test]
async fn an_unknown_name_is_an_error_naming_it() {
    let dns = dns_fixture("127.0.0.204").await;
    let r = Resolver::with_name_servers(&[dns]);
    let err = r
        .resolve(&name(Transport::Udp, "nowhere.test", Some(5060)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nowhere.test"), "{err}");
}

#[tokio::test]
async fn addresses_need_no_lookup() {
    let r = Resolver::with_name_servers(&["127.0.0.1:9".parse().unwrap()]);
    let hop = NextHop::Addr {
        transport: Transport::Udp,
        addr: "[2001:db8::1]:5060".parse().unwrap(),
    };
    assert_eq!(
        r.resolve(&hop).await.unwrap(),
        (Transport::Udp, "[2001:db8::1]:5060".parse().unwrap())
    );
}
