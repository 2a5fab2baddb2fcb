//! `settings::connect` (what every service and the CLI use) against real nats-servers that
//! require credentials, with certificates, nkeys and JWTs generated here: user/password over
//! TLS with a CA, token, nkey, and a creds file (operator mode); wrong credentials fail with
//! an error naming the setting.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use lathe_runtime::RuntimeError;
use lathe_runtime::settings::{NatsSettings, connect};
use lathe_testkit::{NatsServer, write_file};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const WAIT: Duration = Duration::from_secs(4);

/// A CA and a server certificate for 127.0.0.1/localhost, as PEM files in `dir`.
fn certificates(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lathe test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "nats");
    let cert = server.signed_by(&key, &issuer).unwrap();
    write_file(dir, "ca.pem", &ca_cert.pem());
    write_file(dir, "server.pem", &cert.pem());
    write_file(dir, "server-key.pem", &key.serialize_pem());
}

fn settings(url: &str) -> NatsSettings {
    NatsSettings::with_url(url)
}

async fn assert_works(s: &NatsSettings) {
    let client = connect(s, "auth-test", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{s:?}: {e}"));
    // Really usable: a request–reply round trip through the server.
    let mut sub = client.subscribe("auth.echo").await.unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        if let Some(m) = futures::StreamExt::next(&mut sub).await {
            responder
                .publish(m.reply.unwrap(), m.payload)
                .await
                .unwrap();
        }
    });
    let reply = client.request("auth.echo", "ping".into()).await.unwrap();
    assert_eq!(&reply.payload[..], b"ping");
}

/// Wrong credentials: an error naming the setting that holds them, without waiting out the
/// whole timeout.
async fn assert_refused(s: &NatsSettings, setting: &str) {
    let started = std::time::Instant::now();
    match connect(s, "auth-test", Duration::from_secs(20)).await {
        Err(e @ RuntimeError::Setting { name, .. }) => {
            assert_eq!(name, setting, "{e}");
            assert!(e.to_string().contains("authorization violation"), "{e}");
        }
        Err(e) => panic!("not a setting error: {e}"),
        Ok(_) => panic!("connected with wrong credentials"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_nkey_over_tls_with_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let nkey = nkeys::KeyPair::new_user();
    let d = dir.path().display();
    let conf = format!(
        "tls {{ cert_file: \"{d}/server.pem\", key_file: \"{d}/server-key.pem\" }}\n\
         authorization {{ users: [ {{user: alice, password: \"s3cret pass\"}}, {{nkey: {}}} ] }}\n",
        nkey.public_key()
    );
    let server =
        NatsServer::start_with(Vec::new(), Some(write_file(dir.path(), "tls.conf", &conf)));
    let tls = NatsSettings {
        tls_ca: Some(dir.path().join("ca.pem")),
        tls_required: true,
        ..settings(&server.url())
    };

    assert_works(&NatsSettings {
        user: Some("alice".into()),
        password: Some("s3cret pass".into()),
        ..tls.clone()
    })
    .await;
    assert_works(&NatsSettings {
        nkey_seed: Some(nkey.seed().unwrap()),
        ..tls.clone()
    })
    .await;

    assert_refused(
        &NatsSettings {
            user: Some("alice".into()),
            password: Some("wrong".into()),
            ..tls.clone()
        },
        "NATS_USER",
    )
    .await;
    assert_refused(
        &NatsSettings {
            nkey_seed: Some(nkeys::KeyPair::new_user().seed().unwrap()),
            ..tls.clone()
        },
        "NATS_NKEY_SEED",
    )
    .await;
    // Without the CA the server's certificate is not trusted: no connection.
    let untrusted = NatsSettings {
        user: Some("alice".into()),
        password: Some("s3cret pass".into()),
        ..settings(&server.url())
    };
    let e = connect(&untrusted, "auth-test", WAIT)
        .await
        .expect_err("refused");
    assert!(matches!(e, RuntimeError::Connect { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_file(
        dir.path(),
        "token.conf",
        "authorization { token: \"t0ken-42\" }\n",
    );
    let server = NatsServer::start_with(Vec::new(), Some(conf));
    assert_works(&NatsSettings {
        token: Some("t0ken-42".into()),
        ..settings(&server.url())
    })
    .await;
    assert_refused(
        &NatsSettings {
            token: Some("t0ken-43".into()),
            ..settings(&server.url())
        },
        "NATS_TOKEN",
    )
    .await;
    // No credentials at all: the error points at where they go.
    assert_refused(&settings(&server.url()), "NATS_USER").await;
}

/// A JWT as nsc writes one: header, claims, ed25519 signature by the issuer's nkey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{:X}", rand::random::<u128>()),
        "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64(&signature))
}

fn creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "lathe-op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let limits = serde_json::json!({"subs": -1, "data": -1, "payload": -1, "imports": -1,
        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
    let mut jetstream_limits = limits.clone();
    for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
        jetstream_limits[k] = (-1).into();
    }
    // The system account may not have JetStream; lathe's account does.
    let acc = |kp: &nkeys::KeyPair, name: &str, limits: &serde_json::Value| {
        jwt(
            &operator,
            &kp.public_key(),
            name,
            serde_json::json!({"type": "account", "version": 2, "limits": limits}),
        )
    };
    let user_claims = serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
        "subs": -1, "data": -1, "payload": -1});
    let conf = format!(
        "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {a}: {aj}, {sys}: {sj} }}\n",
        sys = system.public_key(),
        a = account.public_key(),
        aj = acc(&account, "lathe", &jetstream_limits),
        sj = acc(&system, "SYS", &limits),
    );
    let server = NatsServer::start_with(Vec::new(), Some(write_file(dir.path(), "op.conf", &conf)));

    let good = write_file(
        dir.path(),
        "lathe.creds",
        &creds(
            &jwt(&account, &user.public_key(), "svc", user_claims.clone()),
            &user.seed().unwrap(),
        ),
    );
    assert_works(&NatsSettings {
        creds_file: Some(good),
        ..settings(&server.url())
    })
    .await;

    // A user signed by an account the server does not know.
    let stranger = nkeys::KeyPair::new_account();
    let other = nkeys::KeyPair::new_user();
    let bad = write_file(
        dir.path(),
        "stranger.creds",
        &creds(
            &jwt(&stranger, &other.public_key(), "svc", user_claims),
            &other.seed().unwrap(),
        ),
    );
    assert_refused(
        &NatsSettings {
            creds_file: Some(bad),
            ..settings(&server.url())
        },
        "NATS_CREDS",
    )
    .await;
    // A creds file that is not there.
    let e = connect(
        &NatsSettings {
            creds_file: Some(dir.path().join("missing.creds")),
            ..settings(&server.url())
        },
        "auth-test",
        WAIT,
    )
    .await
    .expect_err("refused");
    assert!(
        matches!(
            e,
            RuntimeError::Setting {
                name: "NATS_CREDS",
                ..
            }
        ),
        "{e}"
    );
}
