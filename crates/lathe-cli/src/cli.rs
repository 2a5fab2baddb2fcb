//! What the user typed: the `lathe` command line, parsed by clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "lathe",
    version,
    about = "Train, compress, deploy and monitor models from one job spec published to NATS"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// NATS server URL (auth and TLS come from NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS,
    /// NATS_NKEY_SEED, NATS_TLS_CA/CERT/KEY).
    #[arg(long, env = "NATS_URL", default_value = lathe_runtime::settings::DEFAULT_NATS_URL, global = true)]
    pub nats_url: String,
    /// Machine-readable JSON output instead of text for people.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a job spec (JSON or TOML) locally, then publish it to lathe.jobs.submit.
    Submit {
        spec: PathBuf,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job's progress, stage by stage and epoch by epoch, until it ends.
    Watch { job: String },
    /// Show a job's record.
    Status { job: String },
    /// List every job.
    Jobs,
    /// Remove the artifacts and records of jobs that ended more than N days ago, keeping every
    /// artifact a version in the model registry points to (active, canary or retired) and the
    /// record of the job it came from.
    Gc {
        /// Only jobs that ended at least this many days ago (0: every ended job).
        #[arg(long, default_value_t = 30.0)]
        older_than_days: f64,
        /// Also forget each model's registry versions beyond the newest N (the active
        /// version, the canary and the version a rollback returns to always stay); their
        /// artifacts and job records then go like any other.
        #[arg(long)]
        keep_versions: Option<usize>,
        /// Report what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Create or update every stream, consumer and bucket lathe uses (idempotent; every
    /// service does the same at start, and the Kubernetes provisioning Job runs this).
    Provision,
    /// Run every stage service in this process (starting a local nats-server when none answers).
    Up,
    /// Run the whole chain on the built-in digits data and print the result.
    Demo,
    /// Draw a job's waterfall (from its record, or from Jaeger with --fetch) and print its Jaeger link.
    Trace {
        job: String,
        /// Jaeger's UI/query base URL, e.g. http://localhost:16686.
        #[arg(long, env = "LATHE_JAEGER_URL")]
        jaeger: Option<String>,
        /// Fetch the trace from Jaeger's query API (/api/v3/traces/<id>) and draw that.
        #[arg(long, requires = "jaeger")]
        fetch: bool,
    },
    /// Deployed models: versions, active, canary, metrics (one model, or all).
    Models { model: Option<String> },
    /// Ask a deployed model: INPUT is JSON (a row, a batch or a whole request), a CSV file
    /// of rows, or comma-separated numbers.
    Infer { model: String, input: String },
    /// A live table of a model's health (from the monitor), redrawn as it changes.
    Monitor {
        model: String,
        /// Print the current figures once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Make a registered version of a model active.
    Promote { model: String, version: u32 },
    /// Withdraw a model's canary, or return to the version active before (or --to VERSION).
    Rollback {
        model: String,
        #[arg(long)]
        to: Option<u32>,
    },
    /// Datasets in the lathe-datasets bucket.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Export a job's dense model as a PyTorch-compatible safetensors state dict.
    Export {
        /// The job whose latest artifact is exported.
        job: String,
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Upload a CSV or IDX file under a name (use it as "bucket:<name>" in a spec).
    Put { name: String, file: PathBuf },
    /// List uploaded datasets.
    List,
}

impl Command {
    /// Whether the command runs stage services in-process (and so wants telemetry set up).
    pub fn runs_services(&self) -> bool {
        matches!(self, Command::Up | Command::Demo)
    }
}
