//! Clusters of containers for the end-to-end tests: a balancer
//! (`viaduct:local`), demo backends (`viaduct-demo-backend:local`), SIPp
//! clients (`viaduct-sipp:local`) and a proxy stand-in
//! (`viaduct-test-proxy:local`), each in its own container on a private
//! network of the test's own. The images are built from our binaries by
//! `ci/images.sh` (no base image, no registry); [`ensure_images`] runs it
//! when one is missing.
//!
//! Containers are started with `testcontainers` (`GenericImage` on local
//! images). Three things it cannot do go through the docker CLI:
//! * the network is created with a fixed subnet (testcontainers creates
//!   networks with default IPAM only), so the balancer's address, which
//!   its config must name (`public_address`), is known before it starts;
//! * a crash is `docker kill` (SIGKILL at once; testcontainers' `stop`
//!   sends SIGTERM first, which the demo backend handles gracefully);
//! * `docker network disconnect` / `connect` (no API for it there).
//!
//! Every container shares one host folder mounted at `/data`: configs,
//! the secret, SIPp scenarios and screens, and the backends' records.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testcontainers::core::{Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The images the container tests run.
pub const IMAGES: [&str; 4] = [
    "viaduct:local",
    "viaduct-demo-backend:local",
    "viaduct-sipp:local",
    "viaduct-test-proxy:local",
];

/// The cluster secret of the container tests.
pub const SECRET: &str = "container tests secret";
/// The admin API token of the container tests.
pub const TOKEN: &str = "container-tests-token";

/// Whether a Docker engine answers (`docker info`).
pub fn docker_available() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `docker ARGS`; returns its stdout, or panics with its stderr.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the images with `ci/images.sh` unless all of them are there.
pub fn ensure_images() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let missing: Vec<&str> = IMAGES
            .iter()
            .copied()
            .filter(|i| {
                !Command::new("docker")
                    .args(["image", "inspect", i])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        eprintln!("images missing: {missing:?}: running ci/images.sh");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/images.sh");
        // The debug binaries the workspace build already made (ci/test.sh
        // builds them): no second, release compile for the tests.
        let status = Command::new("bash")
            .arg(&script)
            .env("PROFILE", "dev")
            .status()
            .unwrap_or_else(|e| panic!("bash {}: {e}", script.display()));
        assert!(status.success(), "ci/images.sh failed: {status}");
    });
}

/// A private network with a fixed /24 subnet, removed on drop.
#[derive(Debug)]
pub struct Network {
    name: String,
    prefix: [u8; 3],
}

impl Network {
    /// Creates `viaduct-<test>-<pid>` on the first free subnet of
    /// 10.213.0.0/16 (a range our tests own).
    pub fn create(test: &str) -> Network {
        let name = format!("viaduct-{test}-{}", std::process::id());
        let _ = Command::new("docker")
            .args(["network", "rm", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = (std::process::id() % 200) as u8;
        for i in 0..50u8 {
            let third = start.wrapping_add(i.wrapping_mul(7)) % 250 + 1;
            let subnet = format!("10.213.{third}.0/24");
            let ok = Command::new("docker")
                .args(["network", "create", "--subnet", &subnet, &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Network {
                    name,
                    prefix: [10, 213, third],
                };
            }
        }
        panic!("no free subnet in 10.213.0.0/16 for network {name}");
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host number `n` of the subnet (.1 is the gateway).
    pub fn ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], n)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A balancer, three demo backends and the shared folder, on a network of
/// their own. Fields drop in order: containers first, then the network.
#[derive(Debug)]
pub struct Cluster {
    /// The balancer's container.
    pub lb: ContainerAsync<GenericImage>,
    /// The backends' containers, named `b1`, `b2`, `b3`.
    pub backends: Vec<ContainerAsync<GenericImage>>,
    /// The network.
    pub net: Network,
    dir: tempfile::TempDir,
}

/// The balancer is the first container on the network: host number 2.
const LB_HOST: u8 = 2;

fn mount(dir: &Path) -> Mount {
    Mount::bind_mount(dir.display().to_string(), "/data")
}

impl Cluster {
    /// Starts the balancer (config: listeners on its network address, the
    /// admin API on `:5080` with [`TOKEN`], then `extra`) and backends
    /// `b1..=b3` (`backend_args` appended), and waits until all three are up.
    pub async fn start(test: &str, extra: &str, backend_args: &[&str]) -> Cluster {
        ensure_images();
        let net = Network::create(test);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let lb_ip = net.ip(LB_HOST);
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text)
                .unwrap_or_else(|e| panic!("writing {name}: {e}"));
        };
        write("secret", SECRET);
        write(
            "viaduct.toml",
            &format!(
                "[[sip.listen]]\ntransport = \"udp\"\naddress = \"0.0.0.0:5060\"\npublic_address = \"{lb_ip}:5060\"\n\
                 [[sip.listen]]\ntransport = \"tcp\"\naddress = \"0.0.0.0:5060\"\npublic_address = \"{lb_ip}:5060\"\n\
                 [agents]\nlisten = \"0.0.0.0:5070\"\nsecret_file = \"secret\"\n\
                 [admin]\nlisten = \"0.0.0.0:5080\"\n{extra}\n"
            ),
        );
        write(
            "uac_call.xml",
            &std::fs::read_to_string(crate::scenario("uac_call.xml"))
                .unwrap_or_else(|e| panic!("scenario: {e}")),
        );
        let lb = GenericImage::new("viaduct", "local")
            .with_wait_for(WaitFor::message_on_stderr("listening for agents"))
            .with_network(net.name())
            .with_container_name(format!("{}-lb", net.name()))
            .with_mount(mount(dir.path()))
            .with_env_var("VIADUCT_ADMIN_TOKEN", TOKEN)
            .with_env_var("VIADUCT_LOG", "info")
            .with_cmd(["run", "--config", "/data/viaduct.toml"])
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting the balancer container: {e}"));
        let got = lb
            .get_bridge_ip_address()
            .await
            .unwrap_or_else(|e| panic!("balancer address: {e}"));
        assert_eq!(
            got,
            std::net::IpAddr::V4(lb_ip),
            "the balancer is not the first host of its fresh network"
        );
        let mut backends = Vec::new();
        for i in 1..=3 {
            let name = format!("b{i}");
            let mut cmd: Vec<String> = [
                "--name",
                &name,
                "--balancer",
                &format!("{lb_ip}:5070"),
                "--secret-file",
                "/data/secret",
                "--record",
                &format!("/data/{name}.record"),
                "--stats-ms",
                "100",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            cmd.extend(backend_args.iter().map(|s| (*s).to_owned()));
            let c = GenericImage::new("viaduct-demo-backend", "local")
                .with_network(net.name())
                .with_container_name(format!("{}-{name}", net.name()))
                .with_mount(mount(dir.path()))
                .with_env_var("VIADUCT_LOG", "warn")
                .with_cmd(cmd)
                .start()
                .await
                .unwrap_or_else(|e| panic!("starting backend {name}: {e}"));
            backends.push(c);
        }
        let cluster = Cluster {
            lb,
            backends,
            net,
            dir,
        };
        cluster
            .wait_up(&["b1", "b2", "b3"], Duration::from_secs(30))
            .await;
        cluster
    }

    /// The shared folder (`/data` in every container).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The balancer's address on the network.
    pub fn lb_ip(&self) -> Ipv4Addr {
        self.net.ip(LB_HOST)
    }

    /// `GET /api/backends`: name -> (up, messages to the backend).
    pub async fn backends_state(&self) -> BTreeMap<String, (bool, u64)> {
        let body = self.admin_get("/api/backends").await;
        Self::parse_backends(&body)
    }

    fn parse_backends(body: &str) -> BTreeMap<String, (bool, u64)> {
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("/api/backends: {e}: {body}"));
        let mut out = BTreeMap::new();
        for b in v["backends"].as_array().into_iter().flatten() {
            out.insert(
                b["name"].as_str().unwrap_or_default().to_owned(),
                (
                    b["up"].as_bool().unwrap_or(false),
                    b["traffic"]["total"]["msgs_to_backend"]
                        .as_u64()
                        .unwrap_or(0),
                ),
            );
        }
        out
    }

    /// A counter of `GET /api/backends` (`failovers`, `rejected_503`, ...).
    pub async fn counter(&self, name: &str) -> u64 {
        let body = self.admin_get("/api/backends").await;
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/backends: {e}: {body}"));
        v["counters"][name].as_u64().unwrap_or(0)
    }

    /// A GET of the admin API with the token; the body. Panics after 5 s.
    pub async fn admin_get(&self, path: &str) -> String {
        self.try_admin_get(path)
            .await
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}"))
    }

    /// A GET of the admin API with the token: the body, or what went wrong.
    pub async fn try_admin_get(&self, path: &str) -> Result<String, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = (self.lb_ip(), 5080);
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: viaduct\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            let mut text = String::new();
            s.read_to_string(&mut text).await?;
            std::io::Result::Ok(text)
        };
        let text = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| "no answer within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
            Ok(body.to_owned())
        } else {
            Err(head.to_owned())
        }
    }

    /// Waits until the named backends are up.
    pub async fn wait_up(&self, names: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // The admin listener may not be up yet (a restart): retry.
            let state = match self.try_admin_get("/api/backends").await {
                Ok(body) => Self::parse_backends(&body),
                Err(_) => BTreeMap::new(),
            };
            if names.iter().all(|n| state.get(*n).is_some_and(|s| s.0)) {
                return;
            }
            assert!(Instant::now() < deadline, "backends not up: {state:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until backend `name` is down; the time it took from `since`.
    pub async fn wait_down(&self, name: &str, since: Instant, within: Duration) -> Duration {
        loop {
            if self.backends_state().await.get(name).is_some_and(|s| !s.0) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < within,
                "{name} not seen down within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Which backends each Call-ID reached, and what each recorded.
    pub fn records(&self) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
        let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for i in 1..=3 {
            let name = format!("b{i}");
            for (call_id, what) in crate::read_record(&self.dir().join(format!("{name}.record"))) {
                out.entry(call_id)
                    .or_default()
                    .entry(name.clone())
                    .or_default()
                    .push(what);
            }
        }
        out
    }

    /// The Call-IDs whose messages reached backend `name`.
    pub fn calls_at(&self, name: &str) -> BTreeSet<String> {
        self.records()
            .into_iter()
            .filter(|(_, at)| at.contains_key(name))
            .map(|(c, _)| c)
            .collect()
    }

    /// Starts a SIPp client container named `sipp-<tag>` against the
    /// balancer with the scenario `/data/uac_call.xml` and `args`
    /// (`-m`, `-r`, `-d`, `-t` ...); its screen goes to
    /// `/data/sipp-<tag>.screen`.
    pub async fn sipp(&self, tag: &str, args: &[&str], timeout_secs: u64) -> Sipp {
        let target = format!("{}:5060", self.lb_ip());
        let screen = format!("/data/sipp-{tag}.screen");
        let mut cmd: Vec<String> = vec![
            target,
            "-sf".into(),
            "/data/uac_call.xml".into(),
            "-p".into(),
            "5060".into(),
            "-nostdin".into(),
            "-timeout".into(),
            format!("{timeout_secs}s"),
            "-timeout_error".into(),
            "-trace_screen".into(),
            "-screen_file".into(),
            screen,
            "-recv_timeout".into(),
            "5000".into(),
        ];
        cmd.extend(args.iter().map(|s| (*s).to_owned()));
        let container = GenericImage::new("viaduct-sipp", "local")
            .with_network(self.net.name())
            .with_container_name(format!("{}-sipp-{tag}", self.net.name()))
            .with_mount(mount(self.dir()))
            .with_cmd(cmd)
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting SIPp: {e}"));
        Sipp {
            container,
            screen: self.dir().join(format!("sipp-{tag}.screen")),
        }
    }
}

/// A SIPp client container.
#[derive(Debug)]
pub struct Sipp {
    /// The container.
    pub container: ContainerAsync<GenericImage>,
    screen: PathBuf,
}

impl Sipp {
    /// Waits for SIPp to exit (at most `within`); returns (successful,
    /// failed) calls from its final screen.
    pub async fn finish(&self, within: Duration) -> (u64, u64, String) {
        let deadline = Instant::now() + within;
        while self.container.is_running().await.unwrap_or(false) {
            assert!(
                Instant::now() < deadline,
                "SIPp still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let screen = std::fs::read_to_string(&self.screen).unwrap_or_default();
        (
            crate::sipp_count(&screen, "Successful call"),
            crate::sipp_count(&screen, "Failed call"),
            screen,
        )
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        self.container.id()
    }
}
