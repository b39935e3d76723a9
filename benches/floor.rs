//! The floor under a cached manifest: a bare hyper server built like ocicache's listener (the
//! same auto HTTP/1+2 builder, timer, keep-alive, `TCP_NODELAY`) that answers every request
//! with the same 1,037-byte manifest and the headers ocicache sends, and does nothing else: no
//! routing, no lookup, no log line, no metrics. What it serves per second is the most ocicache
//! could serve through hyper on this machine; beside nginx's static file it says how much of
//! the gap to nginx is ours and how much is the HTTP stack's.
//!
//! `cargo bench --bench floor`: serves on a free loopback port and runs `wrk -t2 -c64 -d10s
//! --latency` against it. `cargo bench --bench floor -- --serve PORT`: only serves, for a
//! script that alternates it with other servers (`benches/floor.sh`).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// A manifest of the size the comparison's `layers:v1` has.
fn manifest() -> Bytes {
    let mut body = String::from(
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":["#,
    );
    while body.len() < 1000 {
        body.push_str(r#"{"size":1,"digest":"sha256:00"},"#);
    }
    body.pop();
    body.push_str("]}");
    while body.len() < 1037 {
        body.insert(body.len() - 1, ' ');
    }
    Bytes::from(body)
}

async fn serve(listener: TcpListener) {
    let body = manifest();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = std::sync::Arc::new(builder);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(
                                "content-type",
                                "application/vnd.oci.image.manifest.v1+json",
                            )
                            .header(
                                "docker-content-digest",
                                "sha256:e29b565fb67988aa6a31c2fc51f4827bd108dcc865be43795948005f91576fe1",
                            )
                            .header(
                                "etag",
                                "\"sha256:e29b565fb67988aa6a31c2fc51f4827bd108dcc865be43795948005f91576fe1\"",
                            )
                            .header("docker-distribution-api-version", "registry/2.0")
                            .header("x-cache", "hit")
                            .body(Full::new(body))
                            .expect("static headers are valid"),
                    )
                }
            });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = args.iter().position(|a| a == "--serve").map(|i| {
        args.get(i + 1)
            .and_then(|p| p.parse::<u16>().ok())
            .expect("--serve PORT")
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0)));
        let listener = TcpListener::bind(addr).await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("bound");
        eprintln!("floor: serving on {addr}");
        if port.is_some() {
            serve(listener).await;
            return;
        }
        tokio::spawn(serve(listener));
        let url = format!("http://{addr}/v2/library/layers/manifests/v1");
        let out = tokio::process::Command::new("wrk")
            .args(["-t2", "-c64", "-d10s", "--latency", &url])
            .output()
            .await;
        match out {
            Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Err(e) => eprintln!(
                "floor: wrk did not run ({e}); serve with --serve PORT and measure by hand"
            ),
        }
    });
}
