//! The load client of the live-service tests and of `cargo xtask bench soak`: N keep-alive
//! HTTP/1.1 connections to a loopback service, each sending GETs one after another for as long
//! as it is told to (bounded in time and in count), recording every response's latency and
//! whether it was byte for byte the reference answer for its path (taken before any tracer
//! attached). It judges answers; the bench's node client (bench/live_service/client.js)
//! measures CPU and wall time instead.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long one response may take before the client gives up on the connection (it is then
/// counted as an error, and a new connection is opened).
pub const GIVE_UP: Duration = Duration::from_secs(30);

/// One full response as received: status line, headers and body, exactly.
pub type RawResponse = Vec<u8>;

/// Sends `GET path` on `stream` and reads one whole response (Content-Length framing).
fn exchange(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    path: &str,
) -> Result<RawResponse, String> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send GET {path}: {e}"))?;
    let mut raw = Vec::new();
    let mut length: Option<usize> = None;
    loop {
        let before = raw.len();
        let n = reader
            .read_until(b'\n', &mut raw)
            .map_err(|e| format!("read the response to GET {path}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the connection closed during the response to GET {path}"
            ));
        }
        let line = &raw[before..];
        if line == b"\r\n" {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if let Some((name, value)) = text.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok();
        }
        if raw.len() > 64 << 10 {
            return Err(format!("response headers to GET {path} exceed 64 KiB"));
        }
    }
    let length =
        length.ok_or_else(|| format!("the response to GET {path} has no Content-Length"))?;
    let start = raw.len();
    raw.resize(start + length, 0);
    reader
        .read_exact(&mut raw[start..])
        .map_err(|e| format!("read the {length}-byte body of GET {path}: {e}"))?;
    Ok(raw)
}

fn connect(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>), String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(GIVE_UP))
        .and_then(|()| stream.set_write_timeout(Some(GIVE_UP)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("set socket options: {e}"))?;
    let reader = BufReader::with_capacity(
        64 << 10,
        stream
            .try_clone()
            .map_err(|e| format!("clone socket: {e}"))?,
    );
    Ok((stream, reader))
}

/// The reference answers: one request per path on one connection, before any load.
pub fn fetch_reference(
    addr: SocketAddr,
    paths: &[String],
) -> Result<HashMap<String, RawResponse>, String> {
    let (mut stream, mut reader) = connect(addr)?;
    let mut out = HashMap::new();
    for path in paths {
        let raw = exchange(&mut stream, &mut reader, path)?;
        // A second request must give the same bytes, or the service is not deterministic
        // and "unchanged" would mean nothing.
        let again = exchange(&mut stream, &mut reader, path)?;
        if again != raw {
            return Err(format!(
                "GET {path} answered differently twice in a row ({} then {} bytes): the service \
                 is not deterministic",
                raw.len(),
                again.len()
            ));
        }
        out.insert(path.clone(), raw);
    }
    Ok(out)
}

/// What the load is and how long it may go on.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    /// Concurrent keep-alive connections, each with one request in flight.
    pub connections: usize,
    /// Paths requested in turn; each must have a reference answer.
    pub paths: Vec<String>,
    /// Stop after this many requests in all...
    pub max_requests: u64,
    /// ... or after this long, whichever comes first (or at [`Load::stop`]).
    pub max_duration: Duration,
}

/// One request: when it was sent (since the load started), how long the answer took, and
/// what came back.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub sent_us: u64,
    pub latency_us: u64,
    pub path: u32,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Byte for byte the reference answer.
    Same,
    /// An answer, but not the reference one.
    Changed,
    /// No answer: the connection failed or timed out (see [`LoadReport::errors`]).
    Failed,
}

/// Everything the load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: Vec<Request>,
    /// What went wrong, one line each (first 100 kept).
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.requests
            .iter()
            .filter(|r| r.outcome == outcome)
            .count()
    }

    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(
            self.requests
                .iter()
                .map(|r| r.latency_us)
                .max()
                .unwrap_or(0),
        )
    }

    /// Latency at quantile `q` (0..=1) of the answered requests.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut l: Vec<u64> = self
            .requests
            .iter()
            .filter(|r| r.outcome != Outcome::Failed)
            .map(|r| r.latency_us)
            .collect();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort_unstable();
        let i = ((l.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Duration::from_micros(l[i])
    }

    /// Requests slower than `limit`, or never answered.
    pub fn slower_than(&self, limit: Duration) -> Vec<Request> {
        let limit = limit.as_micros() as u64;
        self.requests
            .iter()
            .filter(|r| r.outcome == Outcome::Failed || r.latency_us > limit)
            .copied()
            .collect()
    }

    /// One line: requests, rate, outcomes, latencies.
    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "{} requests in {:.1} s ({:.0}/s): {} unchanged, {} changed, {} failed; latency p50 {:?}, \
             p99 {:?}, max {:?}",
            self.requests.len(),
            secs,
            self.requests.len() as f64 / secs,
            self.count(Outcome::Same),
            self.count(Outcome::Changed),
            self.count(Outcome::Failed),
            self.latency_quantile(0.5),
            self.latency_quantile(0.99),
            self.max_latency()
        )
    }
}

struct Shared {
    stop: AtomicBool,
    issued: AtomicU64,
    answered: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// A running load; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    shared: Arc<Shared>,
    started: Instant,
    workers: Vec<JoinHandle<Vec<Request>>>,
}

impl Load {
    /// Starts `config.connections` client threads. Every path must be in `reference`.
    pub fn start(config: LoadConfig, reference: Arc<HashMap<String, RawResponse>>) -> Load {
        assert!(
            config.paths.iter().all(|p| reference.contains_key(p)),
            "every path of the load needs a reference answer"
        );
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            issued: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        });
        let started = Instant::now();
        let paths = Arc::new(config.paths.clone());
        let workers = (0..config.connections)
            .map(|w| {
                let (shared, paths, reference, config) = (
                    shared.clone(),
                    paths.clone(),
                    reference.clone(),
                    config.clone(),
                );
                thread::spawn(move || worker(w, &config, &paths, &reference, &shared, started))
            })
            .collect();
        Load {
            shared,
            started,
            workers,
        }
    }

    /// Requests answered so far (changed or not).
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }

    /// Whether every worker has stopped on its own (count or time bound reached).
    pub fn finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stops sending, waits for the requests in flight, and returns every request seen.
    pub fn stop(self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut requests = Vec::new();
        for w in self.workers {
            match w.join() {
                Ok(mut r) => requests.append(&mut r),
                Err(_) => self
                    .shared
                    .errors
                    .lock()
                    .expect("errors lock")
                    .push("a load client thread panicked".into()),
            }
        }
        requests.sort_by_key(|r| r.sent_us);
        let errors = std::mem::take(&mut *self.shared.errors.lock().expect("errors lock"));
        LoadReport {
            requests,
            errors,
            elapsed: self.started.elapsed(),
        }
    }
}

fn worker(
    index: usize,
    config: &LoadConfig,
    paths: &[String],
    reference: &HashMap<String, RawResponse>,
    shared: &Shared,
    started: Instant,
) -> Vec<Request> {
    let mut out = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut next = index;
    let note = |e: String| {
        let mut errors = shared.errors.lock().expect("errors lock");
        if errors.len() < 100 {
            errors.push(e);
        }
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) || started.elapsed() >= config.max_duration {
            break;
        }
        if shared.issued.fetch_add(1, Ordering::Relaxed) >= config.max_requests {
            break;
        }
        let path_index = next % paths.len();
        next = next.wrapping_add(config.connections.max(1) + 1);
        let path = &paths[path_index];
        let sent = Instant::now();
        let sent_us = sent.duration_since(started).as_micros() as u64;
        let result = match conn.as_mut() {
            Some((stream, reader)) => exchange(stream, reader, path),
            None => match connect(config.addr) {
                Ok(mut c) => {
                    let r = exchange(&mut c.0, &mut c.1, path);
                    conn = Some(c);
                    r
                }
                Err(e) => Err(e),
            },
        };
        let latency_us = sent.elapsed().as_micros() as u64;
        let outcome = match result {
            Ok(raw) if raw == reference[path] => Outcome::Same,
            Ok(raw) => {
                note(format!(
                    "GET {path} at {sent_us} us: answer differs from the reference ({} bytes, \
                     reference {}): {:?}",
                    raw.len(),
                    reference[path].len(),
                    String::from_utf8_lossy(&raw[..raw.len().min(200)])
                ));
                Outcome::Changed
            }
            Err(e) => {
                note(format!("connection {index} at {sent_us} us: {e}"));
                conn = None;
                // Do not spin on a dead service.
                thread::sleep(Duration::from_millis(50));
                Outcome::Failed
            }
        };
        if outcome != Outcome::Failed {
            shared.answered.fetch_add(1, Ordering::Relaxed);
        }
        out.push(Request {
            sent_us,
            latency_us,
            path: path_index as u32,
            outcome,
        });
    }
    out
}
