//! Hostile connections to the API: idle ones by the thousand, half a
//! header, a body promised and never sent, answers never read. Each
//! listener holds a bounded number of connections, each for a bounded
//! time, so the Unix socket, the inbox and the API keep working; and the
//! small parsing rules (the bearer scheme, ids) are exact.

use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};

use nightshift::api::client::{CallError, Target};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::common::*;

fn alpha(base_url: String) -> ProviderSpec<'static> {
    ProviderSpec {
        name: "alpha",
        base_url,
        model: "alpha-chat",
        input_per_mtok: 0.10,
        output_per_mtok: 0.40,
        extra: "",
    }
}

/// The sockets process `pid` holds open.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Reads until the peer closes; what it sent, or the read error (a reset
/// is a close too).
async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// [`read_until_closed`] within `timeout`, and how long it took from `since`.
async fn closed_within(
    what: &str,
    stream: &mut (impl AsyncRead + Unpin),
    since: Instant,
    timeout: Duration,
) -> (Vec<u8>, Duration) {
    match tokio::time::timeout(timeout, read_until_closed(stream)).await {
        Ok(got) => (got, since.elapsed()),
        Err(_) => panic!("{what}: still open after {timeout:?}"),
    }
}

/// The soft descriptor limit of this test process raised to its hard one:
/// the test holds 1,100 connections itself.
fn raise_own_fd_limit(needed: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= needed,
        "this test needs {needed} descriptors; the hard RLIMIT_NOFILE is {hard}"
    );
    if limit.current.is_some_and(|soft| soft < needed) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .unwrap();
    }
}

const IDLE_CONNECTIONS: usize = 1100;
const FD_LIMIT: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_tcp_connections_starve_neither_the_socket_nor_the_inbox() {
    raise_own_fd_limit(IDLE_CONNECTIONS as u64 + 400);
    // Those beyond the listener's 256 wait in the kernel's accept queue
    // (1024, capped by somaxconn); a handshake dropped from a full queue
    // would leave the client believing it is connected, and never closed.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map_or(4096, |s| s.trim().parse().unwrap());
    assert!(
        somaxconn >= IDLE_CONNECTIONS - 256,
        "this test needs net.core.somaxconn >= {}, not {somaxconn}",
        IDLE_CONNECTIONS - 256
    );
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The default max_connections (256 per listener); short timeouts.
    let daemon = Daemon::start_with_fd_limit(
        dir.path(),
        &api_config_toml(
            dir.path(),
            &[alpha(provider.base_url())],
            "header_timeout = \"2s\"\nidle_timeout = \"2s\"",
        ),
        FD_LIMIT,
    );
    let addr = daemon.tcp_addr().await;
    daemon.wait_ready().await;
    assert!(
        daemon.log_text().contains("RLIMIT_NOFILE"),
        "the descriptor limit is logged at start"
    );
    // A new connection for each request: a kept one proves nothing about accepting.
    let unix = || nightshift::api::client::Client::new(Target::Unix(daemon.socket()));

    // No token, nothing sent (even ones) or half a header (odd ones); 50 at
    // a time, so that each batch fits the kernel's accept queue (128 by
    // default) even where the daemon accepts without a cap.
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for batch in 0..IDLE_CONNECTIONS / 50 {
        let mut opening = tokio::task::JoinSet::new();
        for i in batch * 50..(batch + 1) * 50 {
            opening.spawn(async move {
                // Before the connect: the daemon may accept it before this
                // task hears that it is connected.
                let connected = Instant::now();
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                if i % 2 == 1 {
                    stream
                        .write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: nightshift\r\n")
                        .await
                        .unwrap();
                }
                (stream, connected)
            });
        }
        while let Some(opened) = opening.join_next().await {
            idle.push(opened.unwrap());
        }
    }

    // The TCP listener fills up to its cap and no further.
    let pid = daemon.pid();
    let mut most = 0;
    wait_until(
        "the daemon to hold its 256 TCP connections",
        Duration::from_secs(20),
        || {
            most = most.max(sockets_of(pid));
            most >= 256
        },
    )
    .await;

    // Meanwhile the socket answers and the inbox ingests.
    let answered = tokio::time::timeout(Duration::from_secs(5), unix().get("/v1/jobs")).await;
    assert!(
        matches!(&answered, Ok(Ok(v)) if v["data"] == json!([])),
        "the Unix socket must answer while TCP is full: {answered:?}"
    );
    drop_file(
        &daemon.jobs(),
        "during.jsonl",
        &chat_line("during", "chat", "hi", None),
    );
    let processed = daemon.jobs().join("processed").join("during.jsonl");
    wait_until(
        "the dropped file to be ingested while TCP is full",
        Duration::from_secs(20),
        || {
            most = most.max(sockets_of(pid));
            processed.exists()
        },
    )
    .await;
    let listed = unix().get("/v1/jobs").await.unwrap();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");

    // Every idle connection is closed, none before its timeout: those the
    // kernel queued are served (and closed) as slots free up.
    let mut closing = tokio::task::JoinSet::new();
    for (mut stream, connected) in idle {
        closing.spawn(async move {
            let (got, after) = closed_within(
                "an idle TCP connection",
                &mut stream,
                connected,
                Duration::from_secs(90),
            )
            .await;
            (got, after)
        });
    }
    let mut closed = 0;
    while let Some(done) = closing.join_next().await {
        let (got, after) = done.unwrap();
        assert!(
            got.is_empty(),
            "an idle connection got an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            after >= Duration::from_secs(2),
            "closed {after:?} after its connect, before its 2 s timeout"
        );
        closed += 1;
        most = most.max(sockets_of(pid));
    }
    assert_eq!(closed, IDLE_CONNECTIONS);
    // 256 TCP connections, the two listeners, the test's Unix client and
    // the daemon's own few: far from the 1,024 descriptors.
    assert!(most <= 256 + 16, "the daemon held {most} sockets at once");
    // And TCP serves again.
    let (base, token) = daemon.tcp_base().await;
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Writes `bytes`, then waits for the close; what came back and how long
/// after the write began (the daemon may read them before it returns).
async fn send_and_wait_close<S: AsyncRead + AsyncWrite + Unpin>(
    what: &str,
    mut stream: S,
    bytes: &[u8],
) -> (String, Duration) {
    let sent = Instant::now();
    stream.write_all(bytes).await.unwrap();
    let (got, after) = closed_within(what, &mut stream, sent, Duration::from_secs(30)).await;
    (String::from_utf8_lossy(&got).into_owned(), after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_a_stalled_body_and_an_idle_connection_are_closed_in_time() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(
            dir.path(),
            &[alpha(provider.base_url())],
            "header_timeout = \"1s\"\nbody_timeout = \"1s\"\nidle_timeout = \"6s\"",
        ),
    );
    daemon.wait_ready().await;
    let socket = daemon.socket();
    assert!(std::fs::metadata(&socket).unwrap().file_type().is_socket());
    let connect = || tokio::net::UnixStream::connect(socket.clone());

    let half_header = async {
        let (got, after) = send_and_wait_close(
            "half a header",
            connect().await.unwrap(),
            b"POST /v1/jobs HTTP/1.1\r\nHost: nightshift\r\nContent-Type: app",
        )
        .await;
        assert_eq!(got, "", "half a header gets no answer");
        assert!(
            after >= Duration::from_secs(1) && after < Duration::from_secs(6),
            "closed {after:?} after half a header (header_timeout 1 s, idle_timeout 6 s)"
        );
    };
    let stalled_body = async {
        let (got, after) = send_and_wait_close(
            "a stalled body",
            connect().await.unwrap(),
            b"POST /v1/jobs HTTP/1.1\r\nHost: nightshift\r\nContent-Type: application/jsonl\r\n\
              Content-Length: 100\r\n\r\n{\"custom_id\": \"stalled\"",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");
        assert!(got.contains("\"code\":\"request_timeout\""), "{got}");
        assert!(got.contains("http.body_timeout"), "{got}");
        assert!(
            after >= Duration::from_secs(1) && after < Duration::from_secs(6),
            "answered and closed {after:?} after the head (body_timeout 1 s)"
        );
    };
    let idle_after_a_request = async {
        // A request answered, then nothing: the connection stays open for
        // idle_timeout (not header_timeout), then closes.
        let mut stream = connect().await.unwrap();
        let asked = Instant::now();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: nightshift\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("\"status\":\"ok\"") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&buf[..n]);
        }
        // Idle from its answer, which comes after the request was sent.
        let (rest, after) = closed_within(
            "an idle keep-alive connection",
            &mut stream,
            asked,
            Duration::from_secs(30),
        )
        .await;
        assert!(rest.is_empty());
        assert!(
            after >= Duration::from_secs(6),
            "an idle connection closed {after:?} after its request (idle_timeout 6 s)"
        );
    };
    let quiet_then_a_request = async {
        // Quiet for longer than header_timeout (but not idle_timeout), then
        // a request: answered, because no head had begun.
        let mut stream = connect().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (got, _) = send_and_wait_close(
            "a late request",
            &mut stream,
            b"GET /healthz HTTP/1.1\r\nHost: nightshift\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    };
    tokio::join!(
        half_header,
        stalled_body,
        idle_after_a_request,
        quiet_then_a_request
    );

    // Nothing was queued by the stalled body; the socket still serves.
    let client = daemon.unix_client().await;
    assert_eq!(client.get("/v1/jobs").await.unwrap()["data"], json!([]));
}

async fn status_and_code(r: Result<Value, CallError>) -> (u16, Option<String>) {
    match r {
        Ok(_) => (200, None),
        Err(CallError::Api { status, body, .. }) => (
            status.as_u16(),
            body["error"]["code"].as_str().map(str::to_owned),
        ),
        Err(e) => panic!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_ids_are_exact() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(dir.path(), &[alpha(provider.base_url())], ""),
    );
    let (base, token) = daemon.tcp_base().await;
    let http = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = http
            .get(format!("{base}/v1/jobs"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "Authorization: {scheme} <token>");
    }
    for wrong in [format!("Basic {token}"), token.clone()] {
        let r = http
            .get(format!("{base}/v1/jobs"))
            .header("authorization", wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }

    let client = daemon.unix_client().await;
    let queued = client
        .json(
            hyper::Method::POST,
            "/v1/jobs",
            Some("application/jsonl"),
            chat_line("one", "chat", "hi", None),
        )
        .await
        .unwrap();
    assert_eq!(queued["jobs"][0]["id"], "job_1", "{queued}");
    assert_eq!(queued["id"], "sub_1", "{queued}");
    assert_eq!(
        status_and_code(client.get("/v1/jobs/job_1").await).await,
        (200, None)
    );
    assert_eq!(
        status_and_code(client.get("/v1/submissions/sub_1").await).await,
        (200, None)
    );
    // Other spellings of job 1 name nothing.
    for path in [
        "/v1/jobs/job_+1",
        "/v1/jobs/job_01",
        "/v1/jobs/%20job_1",
        "/v1/jobs/job_1%20",
        "/v1/jobs/1",
        "/v1/jobs/JOB_1",
        "/v1/submissions/sub_01",
        "/v1/submissions/1",
    ] {
        assert_eq!(
            status_and_code(client.get(path).await).await,
            (404, Some("not_found".into())),
            "{path}"
        );
    }
    for path in [
        "/v1/jobs?after=job_+0",
        "/v1/jobs?after=1",
        "/v1/batches?after=batch_01",
    ] {
        assert_eq!(
            status_and_code(client.get(path).await).await,
            (400, Some("invalid_value".into())),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_is_closed_after_idle_timeout() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &api_config_toml(
            dir.path(),
            &[alpha(provider.base_url())],
            "header_timeout = \"1s\"\nidle_timeout = \"2s\"",
        ),
    );
    let addr = daemon.tcp_addr().await;
    // No token: pipelined requests, each answered 401, none of the answers
    // read. Once the socket buffers are full the daemon's writes wait; a
    // request is always in flight, so only a deadline on the wait ends it.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_unread, mut writer) = stream.into_split();
    let requests = b"GET /v1/jobs HTTP/1.1\r\nHost: nightshift\r\n\r\n".repeat(1000);
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Err(e) = writer.write_all(&requests).await {
                return e;
            }
        }
    })
    .await
    .expect("a client that reads nothing must not hold its connection");
    assert!(
        matches!(
            refused.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{refused}"
    );
    // The socket still serves.
    let client = daemon.unix_client().await;
    assert_eq!(client.get("/v1/jobs").await.unwrap()["data"], json!([]));
}
