//! Open-loop latency probe for `bench/sidecar.sh`: sends GETs at a fixed rate over pooled
//! keep-alive connections and prints exact percentiles in microseconds (wrk and hey round to
//! 10–100 µs, too coarse to see one proxy hop).
//!
//!   hop_latency URL [--host NAME] [--rate 1000] [--seconds 10]
//!
//! Requests go out on schedule whether or not earlier ones have answered (open loop), so a stall
//! shows up as slow answers rather than as a lower rate. Each is timed from when it is sent: tokio's
//! timer ticks in whole milliseconds, and timing from the tick would add that jitter to every figure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::{Instant, MissedTickBehavior};

struct Args {
    url: Uri,
    host: Option<String>,
    rate: u32,
    seconds: u64,
}

fn args() -> Result<Args, String> {
    let mut raw = std::env::args().skip(1);
    let mut args = Args {
        url: Uri::from_static("/"),
        host: None,
        rate: 1000,
        seconds: 10,
    };
    let mut url = None;
    while let Some(arg) = raw.next() {
        let mut value = |name: &str| raw.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--host" => args.host = Some(value("--host")?),
            "--rate" => {
                args.rate = value("--rate")?
                    .parse()
                    .map_err(|e| format!("--rate: {e}"))?
            }
            "--seconds" => {
                args.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            _ if url.is_none() => url = Some(arg.parse().map_err(|e| format!("URL: {e}"))?),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    args.url = url.ok_or("usage: hop_latency URL [--host NAME] [--rate N] [--seconds N]")?;
    if args.rate == 0 {
        return Err("--rate must be at least 1".into());
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let samples = Arc::new(Mutex::new(Vec::with_capacity(
        (u64::from(args.rate) * args.seconds) as usize,
    )));
    let errors = Arc::new(Mutex::new(0u64));

    // Warm the pool so connection setup is not measured.
    for _ in 0..50 {
        let _ = send(&client, &args).await;
    }

    let mut ticks = tokio::time::interval(Duration::from_secs(1) / args.rate);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut running = tokio::task::JoinSet::new();
    loop {
        let due = ticks.tick().await;
        if due >= end {
            break;
        }
        let client = client.clone();
        let request = build(&args);
        let samples = samples.clone();
        let errors = errors.clone();
        running.spawn(async move {
            let sent = Instant::now();
            let ok = match client.request(request).await {
                Ok(response) => {
                    let ok = response.status().is_success();
                    ok && response.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            };
            let took = sent.elapsed();
            if ok {
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(took);
            } else {
                *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            }
        });
        // Reap finished requests so the set does not grow for the whole run.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}

    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    samples.sort_unstable();
    let errors = *errors.lock().unwrap_or_else(|e| e.into_inner());
    if samples.is_empty() {
        eprintln!("no successful requests ({errors} errors)");
        std::process::exit(1);
    }
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index].as_secs_f64() * 1e6
    };
    println!(
        "requests {} errors {errors} p50_us {:.0} p90_us {:.0} p99_us {:.0} p999_us {:.0} max_us {:.0}",
        samples.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

fn build(args: &Args) -> Request<Empty<Bytes>> {
    let mut request = Request::get(args.url.clone());
    if let Some(host) = &args.host {
        request = request.header(header::HOST, host.as_str());
    }
    request.body(Empty::new()).unwrap_or_default()
}

async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let response = client.request(build(args)).await?;
    response.into_body().collect().await?;
    Ok(())
}
