//! The `viaduct` binary, driven as a user would: check a configuration,
//! serve on real sockets (loopback, an address of its own), answer SIP.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // tests drive: they may unwrap and spawn

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use viaduct_tests::free_port;

/// The balancer process; killed when the test ends, pass or fail.
struct Viaduct(Child);

impl Drop for Viaduct {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(ip: &str) -> (Viaduct, SocketAddr) {
    start_with(ip, &[])
}

/// [`start`] with extra environment variables.
fn start_with(ip: &str, env: &[(&str, &str)]) -> (Viaduct, SocketAddr) {
    let port = free_port(ip, &[]);
    let agent_port = free_port(ip, &[port]);
    let dir = std::env::temp_dir().join(format!("viaduct-cli-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("viaduct.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nretry_after_secs = 9\n[[sip.listen]]\ntransport = \"udp\"\naddress = \"{ip}:{port}\"\n\
             [[sip.listen]]\ntransport = \"tcp\"\naddress = \"{ip}:{port}\"\n\
             [agents]\nlisten = \"{ip}:{agent_port}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::cargo_bin("viaduct")
        .unwrap()
        .arg("--config")
        .arg(&config)
        .env("VIADUCT_LOG", "info")
        .envs(env.iter().copied())
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

/// An OPTIONS request; its Via asks for `rport` (RFC 3581), so the answer
/// goes back to the source port of the test's socket.
fn options(call_id: &str, transport: &str) -> String {
    format!(
        "OPTIONS sip:lb.example.com SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.62:5999;rport;branch=z9hG4bK-{call_id}\r\n\
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
        .env_remove("VIADUCT_SECRET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The effective configuration, defaults included, on stdout.
    let effective = String::from_utf8_lossy(&out.stdout);
    for line in [
        "[agents]",
        "listen = \"127.0.0.1:5070\"",
        "address = \"127.0.0.1:5060\"",
        "bad_tag_policy = \"treat-as-untagged\"",
        "report_interval_ms = 500",
    ] {
        assert!(
            effective.contains(line),
            "{line} missing from:\n{effective}"
        );
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("development secret"),
        "check-config says the development secret would be used"
    );

    // A type error names the line; a missing secret file names the field.
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[routing]\n\nmissed_reports_down = \"three\"\n").unwrap();
    let out = Command::cargo_bin("viaduct")
        .unwrap()
        .args(["check-config".as_ref(), typo.as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 3"), "{err}");
    let nosecret = dir.join("nosecret.toml");
    std::fs::write(&nosecret, "[agents]\nsecret_file = \"missing-secret\"\n").unwrap();
    let out = Command::cargo_bin("viaduct")
        .unwrap()
        .args(["check-config".as_ref(), nosecret.as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("agents.secret_file"),
        "{err}"
    );
}

/// SIGHUP re-reads the file and applies what can change at run time (the
/// log filter, Retry-After, the bad-tag policy); SIGTERM stops and exits 0.
/// Logs in JSON.
#[test]
fn sighup_reloads_and_sigterm_exits_cleanly() {
    let ip = "127.0.0.63";
    let port = free_port(ip, &[]);
    let agent_port = free_port(ip, &[port]);
    let dir = std::env::temp_dir().join(format!("viaduct-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("viaduct.toml");
    let text = |filter: &str, retry: u32, policy: &str| {
        format!(
            "[sip]\nretry_after_secs = {retry}\n[[sip.listen]]\ntransport = \"tcp\"\naddress = \"{ip}:{port}\"\n\
             [agents]\nlisten = \"{ip}:{agent_port}\"\n[admin]\nenabled = false\n\
             [routing]\nbad_tag_policy = \"{policy}\"\n[log]\nfilter = \"{filter}\"\n"
        )
    };
    std::fs::write(&config, text("info", 5, "treat-as-untagged")).unwrap();
    let mut child = Command::cargo_bin("viaduct")
        .unwrap()
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env_remove("VIADUCT_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let viaduct_pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut viaduct = Viaduct(child);
    let wait_for = |what: &str| loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no log line containing {what:?}"));
        assert!(line.starts_with('{'), "JSON log lines: {line}");
        if line.contains(what) {
            return line;
        }
    };
    wait_for("listening for agents");
    let signal = |name: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {viaduct_pid}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    };

    // An in-dialog request with a forged tag, and no backend at all.
    let forged = |n: u32| {
        format!(
            "BYE sip:ivr@{ip}:{port};vd=0001000000000000f SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.64:5060;branch=z9hG4bK-f{n}\r\n\
             From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: forged-{n}\r\nCSeq: {n} BYE\r\n\
             Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let ask = |n: u32| {
        let mut tcp = TcpStream::connect((ip, port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(forged(n).as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while !got.ends_with(b"\r\n\r\n") {
            let k = tcp.read(&mut buf).unwrap();
            assert!(k > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..k]);
        }
        String::from_utf8(got).unwrap()
    };
    let before = ask(1);
    assert!(
        before.starts_with("SIP/2.0 503 ") && before.contains("Retry-After: 5\r\n"),
        "{before}"
    );

    std::fs::write(&config, text("debug", 7, "reject")).unwrap();
    signal("HUP");
    wait_for("log filter changed");
    wait_for("reload: routing policies");
    let after = ask(2);
    assert!(
        after.starts_with("SIP/2.0 403 "),
        "the reloaded policy rejects forged tags: {after}"
    );
    // A change that needs a restart is named as such.
    std::fs::write(
        &config,
        text("debug", 7, "reject").replace("[log]", "[limits]\nmax_headers = 100\n[log]"),
    )
    .unwrap();
    signal("HUP");
    let restart = wait_for("after a restart");
    assert!(restart.contains("limits"), "{restart}");

    signal("TERM");
    wait_for("shutting down");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = viaduct.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
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

    // A message above the size limits is answered 413, then the stream closes.
    let mut big = TcpStream::connect(addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    big.write_all(
        options("tcp-big", "TCP")
            .replace("Content-Length: 0", "Content-Length: 999999")
            .as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    loop {
        match big.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("expected 413 then close: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("SIP/2.0 413 "), "{text}");
    assert!(text.contains("Call-ID: tcp-big"), "{text}");

    // A stream that cannot be framed is closed.
    tcp.write_all(b"INVITE sip:x SIP/2.0\r\nContent-Length: -1\r\n\r\n")
        .unwrap();
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the balancer to close the connection");
}

/// `viaduct run` serves with glibc's mmap threshold fixed: it starts itself
/// again once, same PID, with GLIBC_TUNABLES naming it; and never a second
/// time (the marker it sets stops it even where the C library drops
/// GLIBC_TUNABLES, as for a binary with file capabilities).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn run_fixes_the_malloc_threshold_by_one_reexec() {
    let environ = |v: &Viaduct| {
        let raw = std::fs::read(format!("/proc/{}/environ", v.0.id())).unwrap();
        raw.split(|&b| b == 0)
            .map(|kv| String::from_utf8_lossy(kv).into_owned())
            .collect::<Vec<_>>()
    };
    let (v, _) = start_with("127.0.0.64", &[("GLIBC_TUNABLES", "")]);
    let vars = environ(&v);
    assert!(
        vars.iter()
            .any(|kv| kv == "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072"),
        "{vars:?}"
    );
    assert!(
        vars.iter().any(|kv| kv == "VIADUCT_MALLOC_REEXEC=1"),
        "{vars:?}"
    );

    let (v, _) = start_with(
        "127.0.0.65",
        &[("GLIBC_TUNABLES", ""), ("VIADUCT_MALLOC_REEXEC", "1")],
    );
    let vars = environ(&v);
    assert!(
        vars.iter().any(|kv| kv == "GLIBC_TUNABLES="),
        "no second start: {vars:?}"
    );
}
