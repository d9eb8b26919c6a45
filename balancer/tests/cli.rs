//! The `viaduct` binary, driven as a user would: check a configuration,
//! serve on real sockets (loopback, an address of its own), answer SIP.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive: they may unwrap and spawn

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;

/// The balancer process; killed when the test ends, pass or fail.
struct Viaduct(Child);

impl Drop for Viaduct {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free on `ip` for both UDP and TCP right now.
fn free_port(ip: &str) -> u16 {
    loop {
        let tcp = TcpListener::bind((ip, 0)).unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

fn start(ip: &str) -> (Viaduct, SocketAddr) {
    let port = free_port(ip);
    let dir = std::env::temp_dir().join(format!("viaduct-cli-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("viaduct.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nretry_after_secs = 9\n[[sip.listen]]\ntransport = \"udp\"\naddress = \"{ip}:{port}\"\n\
             [[sip.listen]]\ntransport = \"tcp\"\naddress = \"{ip}:{port}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::cargo_bin("viaduct")
        .unwrap()
        .arg("--config")
        .arg(&config)
        .env("VIADUCT_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both listeners are up (the binary logs each one).
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut up = 0;
    while up < 2 {
        let line = lines
            .next()
            .expect("viaduct exited before listening")
            .unwrap();
        if line.contains("listening for SIP") {
            up += 1;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (
        Viaduct(child),
        SocketAddr::from((ip.parse::<std::net::IpAddr>().unwrap(), port)),
    )
}

fn options(call_id: &str, transport: &str) -> String {
    format!(
        "OPTIONS sip:lb.example.com SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.62:5999;branch=z9hG4bK-{call_id}\r\n\
         From: <sip:probe@example.com>;tag=p1\r\nTo: <sip:lb.example.com>\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

#[test]
fn check_config_names_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("viaduct-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_headers = 1\n").unwrap();
    let out = Command::cargo_bin("viaduct")
        .unwrap()
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("limits.max_headers"),
        "{err}"
    );

    let good = dir.join("good.toml");
    std::fs::write(&good, "").unwrap();
    let out = Command::cargo_bin("viaduct")
        .unwrap()
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_backends_requests_get_503_on_udp_and_tcp() {
    let (_viaduct, addr) = start("127.0.0.61");

    let udp = UdpSocket::bind("127.0.0.62:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp.send_to(options("udp-1", "UDP").as_bytes(), addr)
        .unwrap();
    let mut buf = [0u8; 4096];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(from, addr);
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(
        reply.starts_with("SIP/2.0 503 Service Unavailable\r\n"),
        "{reply}"
    );
    assert!(
        reply.contains("Call-ID: udp-1\r\n") && reply.contains("Retry-After: 9\r\n"),
        "{reply}"
    );

    // TCP: a keep-alive ping, then two pipelined requests in one write.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(
        format!(
            "\r\n\r\n{}{}",
            options("tcp-1", "TCP"),
            options("tcp-2", "TCP")
        )
        .as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    while got.windows(7).filter(|w| w == b"Call-ID").count() < 2 || !got.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("\r\nSIP/2.0 503 "),
        "pong first, then answers: {text:?}"
    );
    let first = text.find("Call-ID: tcp-1").unwrap();
    let second = text.find("Call-ID: tcp-2").unwrap();
    assert!(first < second, "answers in request order");

    // A stream that cannot be framed is closed.
    tcp.write_all(b"INVITE sip:x SIP/2.0\r\nContent-Length: -1\r\n\r\n")
        .unwrap();
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the balancer to close the connection");
}
