//! Device logins: who may connect, and what a flood of wrong passwords may cost.
//!
//! - A secret verified once this run is remembered per device as a SHA-256 digest (with
//!   the configured hash it was checked against): a reconnect storm of a legitimate
//!   device costs one argon2 verification in all, and it is never throttled.
//! - Every other attempt first waits out its throttle ([`super::throttle`]): consecutive
//!   failures of a device and of a source address each impose a growing wait; an attempt
//!   during the wait is refused without checking the password, and so is one while an
//!   argon2 check of the same device runs.
//! - Argon2 verifications run on the blocking pool, at most `max_verifications` at once
//!   (memory is per verification: `m` KiB of the PHC string each); an attempt that cannot
//!   get a turn before its connect deadline is refused as busy.
//! - A refusal is answered after a hold (the new wait, at most [`MAX_HOLD`]), so one
//!   connection cannot retry faster than its throttle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::throttle::{Policy, Throttle};
use crate::config::{Password, SharedDevices};
use crate::model::{now_ms, DeviceId};

/// Longest a refused login is held before its CONNACK.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(5);

/// Throttle keys kept per kind (devices are bounded by the config anyway).
const MAX_THROTTLE_KEYS: usize = 4096;

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NoCredentials,
    UnknownDevice,
    BadPassword,
    /// The device or the address is waiting out failed attempts.
    Throttled,
    /// No argon2 turn before the connect deadline.
    Busy,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AuthSettings {
    pub max_verifications: usize,
    pub failure_delay_ms: i64,
    pub failure_delay_max_ms: i64,
}

/// The outcome of one attempt: the device, or the refusal and how long to hold it.
pub(crate) type Outcome = Result<DeviceId, (Refusal, Duration)>;

pub(crate) struct Auth {
    devices: SharedDevices,
    /// Where argon2 runs (a blocking pool the broker's held connections do not use).
    helpers: tokio::runtime::Handle,
    verifications: Arc<tokio::sync::Semaphore>,
    throttle_devices: Mutex<Throttle<DeviceId>>,
    throttle_addrs: Mutex<Throttle<IpAddr>>,
    /// Device -> (the configured hash, SHA-256 of the secret that matched it).
    verified: Mutex<HashMap<DeviceId, (String, [u8; 32])>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Auth {
    pub fn new(devices: SharedDevices, helpers: tokio::runtime::Handle, s: AuthSettings) -> Self {
        let policy = Policy {
            base_ms: s.failure_delay_ms,
            max_ms: s.failure_delay_max_ms,
            forget_ms: (s.failure_delay_max_ms * 20).max(60_000),
            max_keys: MAX_THROTTLE_KEYS,
        };
        Auth {
            devices,
            helpers,
            verifications: Arc::new(tokio::sync::Semaphore::new(s.max_verifications.max(1))),
            throttle_devices: Mutex::new(Throttle::new(policy)),
            throttle_addrs: Mutex::new(Throttle::new(policy)),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Forget what was verified for these devices (a reload removed or changed them).
    pub fn forget(&self, devices: &[DeviceId]) {
        let mut v = lock(&self.verified);
        for d in devices {
            v.remove(d);
        }
    }

    /// Check one login. `deadline` bounds the wait for an argon2 turn.
    pub async fn login(
        &self,
        username: Option<&str>,
        password: &str,
        addr: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        let Some(username) = username else {
            return Err((Refusal::NoCredentials, self.failed(None, addr)));
        };
        let table = self.devices.load();
        let Some(device) = table.get(username) else {
            return Err((Refusal::UnknownDevice, self.failed(None, addr)));
        };
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        if let Password::Argon2(hash) = &device.password {
            let known = lock(&self.verified).get(&device.id).cloned();
            if let Some((known_hash, known_digest)) = known {
                if known_hash == *hash && bool::from(known_digest.ct_eq(&digest)) {
                    return Ok(device.id.clone());
                }
            }
        }
        let now = now_ms();
        {
            let mut devices = lock(&self.throttle_devices);
            let wait = devices
                .wait_ms(&device.id, now)
                .max(lock(&self.throttle_addrs).wait_ms(&addr, now));
            if wait > 0 {
                return Err((Refusal::Throttled, hold(wait)));
            }
            // Until this (slow) check ends, other attempts of the device wait: parallel
            // guesses cannot all slip in before the first failure is known.
            if matches!(device.password, Password::Argon2(_)) {
                devices.begin(&device.id, now);
            }
        }
        let ok = match &device.password {
            Password::Argon2(hash) => {
                let Ok(permit) =
                    tokio::time::timeout_at(deadline, self.verifications.clone().acquire_owned())
                        .await
                else {
                    lock(&self.throttle_devices).abandon(&device.id);
                    return Err((Refusal::Busy, Duration::ZERO));
                };
                let password_check = device.password.clone();
                let given = password.to_owned();
                let ok = self
                    .helpers
                    .spawn_blocking(move || {
                        let _turn = permit;
                        password_check.verify(given.as_bytes())
                    })
                    .await
                    .unwrap_or(false);
                if ok {
                    lock(&self.verified).insert(device.id.clone(), (hash.clone(), digest));
                }
                ok
            }
            other => other.verify(password.as_bytes()),
        };
        if ok {
            lock(&self.throttle_devices).succeed(&device.id);
            lock(&self.throttle_addrs).succeed(&addr);
            Ok(device.id.clone())
        } else {
            Err((Refusal::BadPassword, self.failed(Some(&device.id), addr)))
        }
    }

    /// Count a failure against the address (and the device, if one was named). An
    /// address already waiting keeps its wait: attempts that cost nothing (unknown user
    /// names) cannot drive it to the longest wait for other devices behind it.
    fn failed(&self, device: Option<&DeviceId>, addr: IpAddr) -> Duration {
        let now = now_ms();
        let mut wait = {
            let mut addrs = lock(&self.throttle_addrs);
            match addrs.wait_ms(&addr, now) {
                0 => addrs.fail(&addr, now),
                waiting => waiting,
            }
        };
        if let Some(d) = device {
            wait = wait.max(lock(&self.throttle_devices).fail(d, now));
        }
        hold(wait)
    }
}

fn hold(wait_ms: i64) -> Duration {
    Duration::from_millis(wait_ms.max(0) as u64).min(MAX_HOLD)
}
