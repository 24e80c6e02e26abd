//! llama.cpp's RPC backend: tracing through layers that live on other machines, and serving this
//! machine's backend to them.
//!
//! The RPC backend (ggml-rpc, built in with `GGML_RPC=ON`, see `.cargo/config.toml`) is reached
//! through ggml's backend registry by name, as llama.cpp's own tools do: the registry hands out
//! `ggml_backend_rpc_add_server` and `ggml_backend_rpc_start_server` by name. An added server's
//! devices join the device list every model load uses, so `n_gpu_layers` places layers on them
//! (and `tensor_split` divides the layers between several servers).

use std::ffi::CString;
use std::os::raw::c_char;

use llama_cpp_sys_2 as sys;

use super::backend;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("this gguf-trace was built without llama.cpp's RPC backend (build with GGML_RPC=ON)")]
    NotBuilt,
    #[error("--rpc {0}: expected HOST:PORT")]
    Endpoint(String),
    #[error("cannot reach the RPC server at {endpoint}: {why} (start one with `gguf-trace rpc-server` or llama.cpp's rpc-server)")]
    Unreachable { endpoint: String, why: String },
    #[error("--rpc {0}: longer than {MAX_NAMED_ENDPOINT} characters (ggml cuts tensor names built from it) and it resolves to an IPv6 address, which ggml-rpc cannot take instead; give the worker's IPv4 address")]
    TooLong(String),
    #[error("the RPC server at {0} offers no device")]
    NoDevice(String),
    #[error("{endpoint} is not a llama.cpp RPC server of this version: {why}")]
    NotRpc { endpoint: String, why: String },
}

/// ggml-rpc's handshake, as the client sends it (ggml-rpc.cpp, `negotiate_hello`): the HELLO
/// command (14), the request's size and the request (the connection capabilities, 24 bytes; all
/// zero: no transport upgrade). The answer is its size (28) and major, minor, patch, padding and
/// the server's capabilities. These are llama.cpp's protocol constants for the version linked
/// here (protocol 7.0); the RPC tests run a real server through this check.
const RPC_CMD_HELLO: u8 = 14;
const RPC_CONN_CAPS_SIZE: usize = 24;
const RPC_PROTO_MAJOR_VERSION: u8 = 7;
/// How long the handshake may take: a server on this network answers in milliseconds.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Say hello as ggml-rpc does and check the answer, with every step bounded by
/// [`HANDSHAKE_TIMEOUT`]: something else listening at the port (a web server waits for a request
/// line forever) would otherwise hang ggml-rpc's own handshake, which has no timeout.
fn handshake(mut s: std::net::TcpStream) -> Result<(), String> {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut req = vec![RPC_CMD_HELLO];
    req.extend_from_slice(&(RPC_CONN_CAPS_SIZE as u64).to_le_bytes());
    req.extend_from_slice(&[0u8; RPC_CONN_CAPS_SIZE]);
    let silent = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "it did not answer the handshake within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        std::io::ErrorKind::UnexpectedEof => "it closed the connection during the handshake".into(),
        _ => e.to_string(),
    };
    s.write_all(&req).and_then(|()| s.flush()).map_err(silent)?;
    let mut size = [0u8; 8];
    s.read_exact(&mut size).map_err(silent)?;
    let want = 4 + RPC_CONN_CAPS_SIZE;
    if u64::from_le_bytes(size) != want as u64 {
        return Err(format!(
            "it answered the handshake with {:?}…, not ggml-rpc's {want}-byte hello",
            String::from_utf8_lossy(&size)
        ));
    }
    let mut rsp = vec![0u8; want];
    s.read_exact(&mut rsp).map_err(silent)?;
    if rsp[0] != RPC_PROTO_MAJOR_VERSION {
        return Err(format!(
            "it speaks RPC protocol {}.{}.{}, this gguf-trace's llama.cpp speaks {RPC_PROTO_MAJOR_VERSION}.x (run the rpc-server of the same llama.cpp version)",
            rsp[0], rsp[1], rsp[2]
        ));
    }
    Ok(())
}

type AddServerFn = unsafe extern "C" fn(*const c_char) -> sys::ggml_backend_reg_t;
type StartServerFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    usize,
    usize,
    *mut sys::ggml_backend_dev_t,
) -> ();

/// A function of the RPC backend, looked up by name in ggml's registry.
fn proc_address(name: &std::ffi::CStr) -> Result<*mut std::ffi::c_void, RpcError> {
    backend::init();
    // SAFETY: the name is NUL-terminated; the registry returns null when RPC is not built in.
    let reg = unsafe { sys::ggml_backend_reg_by_name(c"RPC".as_ptr()) };
    if reg.is_null() {
        return Err(RpcError::NotBuilt);
    }
    // SAFETY: reg is the live RPC registry entry; name is NUL-terminated.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
    if f.is_null() {
        return Err(RpcError::NotBuilt);
    }
    Ok(f)
}

/// Check "HOST:PORT", that something listens there and that it answers ggml-rpc's handshake:
/// ggml-rpc aborts the process when it cannot connect, and waits forever for an answer that does
/// not come, so both must be caught here with a clear error.
pub fn check_endpoint(endpoint: &str) -> Result<std::net::SocketAddr, RpcError> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| RpcError::Endpoint(endpoint.to_string()))?;
    // IPv4 first: ggml-rpc itself resolves host names to IPv4 only.
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port.parse::<u16>().unwrap_or(0)))
        .map_err(|e| RpcError::Unreachable {
            endpoint: endpoint.into(),
            why: e.to_string(),
        })?
        .min_by_key(std::net::SocketAddr::is_ipv6)
        .ok_or_else(|| RpcError::Unreachable {
            endpoint: endpoint.into(),
            why: "no address".into(),
        })?;
    let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|e| RpcError::Unreachable {
            endpoint: endpoint.into(),
            why: e.to_string(),
        })?;
    handshake(s).map_err(|why| RpcError::NotRpc {
        endpoint: endpoint.into(),
        why,
    })?;
    Ok(addr)
}

/// The longest endpoint whose name survives in ggml's tensor names: the scheduler names the copy
/// of a tensor sent to a worker "RPC<d>[HOST:PORT]#<tensor>#<copy>" in GGML_MAX_NAME (64) bytes,
/// NUL included, and the graph check follows copies of `l_out-<block>` by that name. With one
/// device digit, a block number up to 999 and one copy digit: 63 − 7 − 9 − 2 = 45.
pub const MAX_NAMED_ENDPOINT: usize = 45;

/// The name ggml-rpc is given for `endpoint` (which resolved to `addr`): the endpoint itself, or
/// where it is too long for ggml's tensor names (a long host name) its IPv4 address and port,
/// which reach the same worker. (ggml-rpc resolves IPv4 names only.)
fn registered_name(endpoint: &str, addr: std::net::SocketAddr) -> Result<String, RpcError> {
    if endpoint.len() <= MAX_NAMED_ENDPOINT {
        return Ok(endpoint.to_string());
    }
    match addr {
        std::net::SocketAddr::V4(v4) => Ok(v4.to_string()),
        std::net::SocketAddr::V6(_) => Err(RpcError::TooLong(endpoint.to_string())),
    }
}

/// Register RPC servers: their devices join the devices every later model load uses (layers go
/// to them with `n_gpu_layers`). Registering the same endpoint twice is harmless.
pub fn add_servers(endpoints: &[String]) -> Result<(), RpcError> {
    // ggml_backend_register appends: registering an endpoint twice would list its devices twice.
    static REGISTERED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let f = proc_address(c"ggml_backend_rpc_add_server")?;
    // SAFETY: the registry returned this symbol for that name; its C signature is
    // `ggml_backend_reg_t (*)(const char *)` (ggml-rpc.h).
    let add: AddServerFn = unsafe { std::mem::transmute::<*mut std::ffi::c_void, AddServerFn>(f) };
    for e in endpoints {
        let addr = check_endpoint(e)?;
        if registered.contains(e) {
            continue;
        }
        let c =
            CString::new(registered_name(e, addr)?).map_err(|_| RpcError::Endpoint(e.clone()))?;
        // SAFETY: c is NUL-terminated and lives across the call (ggml copies it).
        let reg = unsafe { add(c.as_ptr()) };
        if reg.is_null() {
            return Err(RpcError::NoDevice(e.clone()));
        }
        // SAFETY: reg is a valid registry entry from ggml-rpc, registered once (checked above).
        unsafe { sys::ggml_backend_register(reg) };
        registered.push(e.clone());
    }
    Ok(())
}

/// Serve this machine's CPU backend over llama.cpp's RPC protocol at `endpoint` (HOST:PORT).
/// Blocks while serving; returns only when the server cannot start.
pub fn serve(endpoint: &str, threads: usize) -> Result<(), RpcError> {
    let f = proc_address(c"ggml_backend_rpc_start_server")?;
    // SAFETY: the registry returned this symbol for that name; its C signature is
    // `void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *)` (ggml-rpc.h).
    let start: StartServerFn =
        unsafe { std::mem::transmute::<*mut std::ffi::c_void, StartServerFn>(f) };
    let c = CString::new(endpoint).map_err(|_| RpcError::Endpoint(endpoint.to_string()))?;
    // SAFETY: device lookup by type after backend init; null when absent (checked).
    let mut cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if cpu.is_null() {
        return Err(RpcError::NoDevice(endpoint.into()));
    }
    // SAFETY: c is NUL-terminated and outlives the call; a null cache directory disables the
    // cache; one device pointer, valid for the process lifetime.
    unsafe { start(c.as_ptr(), std::ptr::null(), threads, 1, &mut cpu) };
    Err(RpcError::Unreachable {
        endpoint: endpoint.into(),
        why: "the server could not start (is the port in use?)".into(),
    })
}

// ---- A worker that stops answering mid-trace ----
//
// ggml-rpc's calls block on their socket with no timeout: a worker that stops answering (a machine
// that froze, a process stopped, a network that dropped its packets) would hang the trace forever.
// A watchdog thread sees whether llama.cpp makes progress while it may be waiting on a worker (a
// model upload, a context's buffers, a decode): the capture callback and llama.cpp's load progress
// mark it. After `--rpc-timeout` seconds without progress it names the worker llama.cpp waits on
// and ends the process through the abort path, which keeps the trace's checkpoints for `--resume`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Seconds without progress after which a worker counts as gone (`--rpc-timeout`'s default): one
/// block of one micro-batch on one worker takes well under a second for models that fit a
/// laptop, and minutes only on a machine that is not computing at all.
pub const DEFAULT_TIMEOUT_S: u64 = 60;

static WATCHING: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicU32 = AtomicU32::new(0);
static LAST_PROGRESS_MS: AtomicU64 = AtomicU64::new(0);
static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Mark progress (llama.cpp computed something or read something): called from the capture
/// callback and the load progress callback, so it only touches atomics and never panics.
pub fn progress() {
    if WATCHING.load(Ordering::Relaxed) {
        LAST_PROGRESS_MS.store(now_ms(), Ordering::Relaxed);
    }
}

/// While alive, llama.cpp may be waiting on a worker: the watchdog counts the time without
/// progress.
pub struct Armed(());

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Arm the watchdog around a call into llama.cpp that may talk to an RPC worker.
pub fn arm() -> Armed {
    LAST_PROGRESS_MS.store(now_ms(), Ordering::Release);
    ARMED.fetch_add(1, Ordering::AcqRel);
    Armed(())
}

/// Start watching the RPC workers `endpoints` (once per process; later calls are ignored).
pub fn watch(endpoints: &[String], timeout_s: u64) {
    if endpoints.is_empty() || WATCHING.swap(true, Ordering::SeqCst) {
        return;
    }
    // Resolved now, not when a worker is silent (the network may be what failed).
    let endpoints: Vec<(String, Vec<std::net::SocketAddr>)> = endpoints
        .iter()
        .map(|e| {
            let addrs = std::net::ToSocketAddrs::to_socket_addrs(e.as_str())
                .map(Iterator::collect)
                .unwrap_or_default();
            (e.clone(), addrs)
        })
        .collect();
    // 0: settings built in code (not from the command line) take the default.
    let timeout_s = if timeout_s == 0 {
        DEFAULT_TIMEOUT_S
    } else {
        timeout_s
    };
    let timeout_ms = timeout_s.saturating_mul(1000);
    LAST_PROGRESS_MS.store(now_ms(), Ordering::Relaxed);
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        // Armed first: an arm() between the two reads marks progress too, so it cannot look idle.
        if ARMED.load(Ordering::Acquire) == 0 {
            continue;
        }
        let idle = now_ms().saturating_sub(LAST_PROGRESS_MS.load(Ordering::Acquire));
        if idle < timeout_ms {
            continue;
        }
        let names: Vec<&str> = endpoints.iter().map(|(e, _)| e.as_str()).collect();
        let who = match stalled_on(&endpoints) {
            Some(e) => format!("the RPC worker at {e}"),
            None if names.len() == 1 => format!("the RPC worker at {}", names[0]),
            None => format!("one of the RPC workers ({})", names.join(", ")),
        };
        backend::stop_process(&format!(
            "{who} stopped answering: no progress for {timeout_s} s (--rpc-timeout)"
        ));
    });
}

/// The endpoint llama.cpp is blocked on, where the system says (Linux: the socket a thread of this
/// process waits in, and its peer); None elsewhere or when no thread waits on a worker.
fn stalled_on(endpoints: &[(String, Vec<std::net::SocketAddr>)]) -> Option<String> {
    let peer = blocked_peer()?;
    for (e, addrs) in endpoints {
        if addrs.contains(&peer) {
            return Some(e.clone());
        }
    }
    Some(peer.to_string())
}

#[cfg(target_os = "linux")]
fn blocked_peer() -> Option<std::net::SocketAddr> {
    let socket_calls = [
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_read,
        libc::SYS_write,
    ];
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(line) = std::fs::read_to_string(task.path().join("syscall")) else {
            continue;
        };
        let mut words = line.split_whitespace();
        let Some(nr) = words.next().and_then(|w| w.parse::<libc::c_long>().ok()) else {
            continue;
        };
        if !socket_calls.contains(&nr) {
            continue;
        }
        let Some(fd) = words
            .next()
            .and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        let link = link.to_string_lossy();
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
        else {
            continue;
        };
        if let Some(peer) = tcp_peer(inode) {
            return Some(peer);
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn blocked_peer() -> Option<std::net::SocketAddr> {
    None
}

/// The remote address of the TCP socket with this inode (`/proc/self/net/tcp` and `tcp6`).
#[cfg(target_os = "linux")]
fn tcp_peer(inode: &str) -> Option<std::net::SocketAddr> {
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            if cols.get(9) == Some(&inode) {
                return cols.get(2).and_then(|a| parse_proc_addr(a));
            }
        }
    }
    None
}

/// `/proc/net/tcp`'s "ADDR:PORT" in hex: the address as 32-bit words in host order, the port big
/// endian.
#[cfg(target_os = "linux")]
fn parse_proc_addr(a: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = a.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip: std::net::IpAddr = match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A connected socket is found by its inode with the peer it was connected to.
    #[test]
    fn proc_tables_name_a_connected_peer() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = l.local_addr().unwrap();
        let s = std::net::TcpStream::connect(peer).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap();
        let link = link.to_string_lossy().into_owned();
        let inode = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .unwrap();
        assert_eq!(tcp_peer(inode), Some(peer));
        let long = "a-worker-with-a-rather-long-name.rack-17.cluster.example.internal:50052";
        let v4: std::net::SocketAddr = "10.1.2.3:50052".parse().unwrap();
        assert_eq!(registered_name(long, v4).unwrap(), "10.1.2.3:50052");
        assert_eq!(registered_name("w1:50052", v4).unwrap(), "w1:50052");
        let v6: std::net::SocketAddr = "[fe80::1]:50052".parse().unwrap();
        assert!(registered_name(long, v6).is_err());
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
    }
}
