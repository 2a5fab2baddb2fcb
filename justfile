# lathe's recipes. On a fresh machine use ./run <recipe>: it installs nats-server and just.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Run the whole chain on the built-in digits data (starts nats-server when none answers).
demo:
    cargo run --release -p lathe-cli --bin lathe -- demo

# Run every stage service in one process against NATS_URL (a local server is started if needed).
up:
    cargo run --release -p lathe-cli --bin lathe -- up

# Lint, then every test (real nats-server, real training).
test: lint
    cargo build --workspace --bins
    cargo test --workspace --no-fail-fast

# Formatting and clippy, warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# One release build of the workspace first (building each package alone resolves other
# features and rebuilds the dependencies several times over), then every bench binary. The
# PyTorch peer runs beside them when a Python with torch is found (LATHE_PEER_PYTHON).
# Benchmarks: tables, JSON, a Markdown summary and an SVG chart under bench/results/.
bench:
    mkdir -p bench/results
    cargo build --release --workspace --bins
    RAYON_NUM_THREADS=1 target/release/lathe-model-bench --out bench/results/model.json
    RAYON_NUM_THREADS=1 target/release/lathe-distill-bench --out bench/results/distill.json
    RAYON_NUM_THREADS=1 target/release/lathe-compress-bench --out bench/results/compress.json
    target/release/lathe-serve-bench --out bench/results/serve.json
    target/release/lathe-pipeline-bench --out bench/results/pipeline.json
    python3 bench/report.py

# Fuzz the artifact reader and the job spec parser for `seconds` each (cargo-fuzz, nightly,
# libFuzzer + AddressSanitizer). Crashes land in fuzz/artifacts/<target>/; the corpus grows in
# fuzz/corpus/<target>/ (seeded with proto/examples/valid for the spec). The artifact target
# starts at full length (-len_control=0): its inputs are edit lists over real bodies.
fuzz seconds="60":
    cargo +nightly fuzz --version >/dev/null || cargo install cargo-fuzz
    mkdir -p fuzz/corpus/spec fuzz/corpus/artifact
    cargo +nightly fuzz run spec fuzz/corpus/spec proto/examples/valid -- -max_total_time={{seconds}} -print_final_stats=1
    cargo +nightly fuzz run artifact --features artifact fuzz/corpus/artifact -- -max_total_time={{seconds}} -len_control=0 -max_len=1024 -print_final_stats=1

# Render every Kubernetes overlay and validate it: core objects against the Kubernetes schemas
# (kubernetes-validate --strict), KEDA ScaledObjects against the CRD's required fields.
k8s-validate:
    python3 deploy/k8s/validate.py

# Validate deploy/compose.yaml offline (docker-compose 1.29's `config`).
compose-validate:
    docker-compose -f deploy/compose.yaml config -q
    @echo "deploy/compose.yaml: valid"

# Rewrite proto/schemas from the Rust types after a deliberate change.
schemas:
    UPDATE_SCHEMAS=1 cargo test -p lathe-proto --test contract
