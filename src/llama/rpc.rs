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
pub fn check_endpoint(endpoint: &str) -> Result<(), RpcError> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| RpcError::Endpoint(endpoint.to_string()))?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port.parse::<u16>().unwrap_or(0)))
        .map_err(|e| RpcError::Unreachable {
            endpoint: endpoint.into(),
            why: e.to_string(),
        })?
        .next()
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
    })
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
        check_endpoint(e)?;
        if registered.contains(e) {
            continue;
        }
        let c = CString::new(e.as_str()).map_err(|_| RpcError::Endpoint(e.clone()))?;
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
