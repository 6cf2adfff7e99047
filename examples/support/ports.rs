//! Free loopback ports, shared by the benchmark commands and the tests (`tests/common`).

/// A free TCP port on loopback (bound and released; the gateway binds it right after).
/// Never the same port twice in one process: the kernel may hand a released port out
/// again at once, and two listeners of one config on one port are refused.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
