//! Hook channels (`/h/<name>`, `/r/<name>`): pubsub channels whose secret
//! guards one side. `GET /h` mints a name and its secret; the secret is the
//! lowercase hex of HMAC-SHA256(key, `"h:" + name`) (`"r:"` for `/r`), so
//! the relay keeps no list of them, and the same key after a restart keeps
//! old secrets valid.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::route::Hook;

/// How long a relay's proof stays valid, in seconds: it is checked when
/// its request arrives, at once, but two relays' clocks may differ.
const RELAY_PROOF_LIFE: u64 = 60;

/// The Unix time in seconds (0 before 1970).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The shortest key accepted from `--secret-key-file` or `PATCHCORD_SECRET_KEY`.
pub const MIN_KEY: usize = 32;

/// The key hook secrets are signed with.
#[derive(Clone)]
pub struct HookKey {
    bytes: Vec<u8>,
    /// Made up at start: hooks will not survive a restart.
    pub generated: bool,
}

impl std::fmt::Debug for HookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HookKey(generated: {})", self.generated)
    }
}

/// A minted hook channel, as `GET /h` answers it.
pub struct Minted {
    pub name: String,
    pub secret: String,
}

impl HookKey {
    /// A key of `bytes` (at least [`MIN_KEY`] of them).
    pub fn new(bytes: Vec<u8>) -> HookKey {
        HookKey {
            bytes,
            generated: false,
        }
    }

    /// A random key for this run only.
    pub fn generate() -> std::io::Result<HookKey> {
        let mut bytes = vec![0u8; MIN_KEY];
        crate::random::fill(&mut bytes)?;
        Ok(HookKey {
            bytes,
            generated: true,
        })
    }

    fn mac(&self, hook: Hook, name: &str) -> Hmac<Sha256> {
        self.signed(hook.as_str(), name)
    }

    /// The HMAC of `domain`, `:` and `text`.
    fn signed(&self, domain: &str, text: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(domain.as_bytes());
        mac.update(b":");
        mac.update(text.as_bytes());
        mac
    }

    /// A relay's proof that it may take the answer waiting on queue
    /// channel `channel` for one of its requesters (the double clutch
    /// across relays), valid for [`RELAY_PROOF_LIFE`] seconds.
    pub fn relay_proof(&self, channel: &str) -> String {
        self.relay_proof_until(channel, unix_now() + RELAY_PROOF_LIFE)
    }

    /// Whether `presented` is a relay's proof for `channel`, still valid.
    pub fn verify_relay(&self, channel: &str, presented: &str) -> bool {
        self.verify_relay_at(channel, presented, unix_now())
    }

    /// The proof for `channel` valid until Unix second `until`:
    /// `<until>.<hex of HMAC("relay:" + until + " " + channel)>`. Only
    /// relays that share the key can make it.
    fn relay_proof_until(&self, channel: &str, until: u64) -> String {
        let mac = self.signed("relay", &format!("{until} {channel}"));
        format!(
            "{until}.{}",
            crate::hex::encode(&mac.finalize().into_bytes())
        )
    }

    /// Whether `presented` is a relay's proof for `channel` that is still
    /// valid at Unix second `now`, compared in constant time.
    fn verify_relay_at(&self, channel: &str, presented: &str, now: u64) -> bool {
        let Some((until, tag)) = presented.split_once('.') else {
            return false;
        };
        let (Ok(until), Some(tag)) = (until.parse::<u64>(), crate::hex::decode32(tag)) else {
            return false;
        };
        until >= now
            && self
                .signed("relay", &format!("{until} {channel}"))
                .verify_slice(&tag)
                .is_ok()
    }

    /// The secret of hook channel `name` (lowercase hex).
    pub fn secret(&self, hook: Hook, name: &str) -> String {
        crate::hex::encode(&self.mac(hook, name).finalize().into_bytes())
    }

    /// Whether `presented` is the secret of `name`, compared in constant time.
    pub fn verify(&self, hook: Hook, name: &str, presented: &str) -> bool {
        match crate::hex::decode32(presented) {
            Some(tag) => self.mac(hook, name).verify_slice(&tag).is_ok(),
            None => false,
        }
    }

    /// A new random channel name and its secret.
    pub fn mint(&self, hook: Hook) -> std::io::Result<Minted> {
        let mut random = [0u8; 16];
        crate::random::fill(&mut random)?;
        let name = crate::hex::encode(&random);
        let secret = self.secret(hook, &name);
        Ok(Minted { name, secret })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hmac_of_kind_and_name() {
        let key = HookKey::new(b"k".repeat(32));
        let secret = key.secret(Hook::Send, "abc");
        assert_eq!(secret.len(), 64);
        assert!(key.verify(Hook::Send, "abc", &secret));
        assert!(key.verify(Hook::Send, "abc", &secret.to_uppercase()));
        assert!(!key.verify(Hook::Read, "abc", &secret));
        assert!(!key.verify(Hook::Send, "abd", &secret));
        assert!(!key.verify(Hook::Send, "abc", &secret[1..]));
        assert!(!key.verify(Hook::Send, "abc", "not hex"));
        // The same key gives the same secret (a restart keeps hooks).
        assert_eq!(
            HookKey::new(b"k".repeat(32)).secret(Hook::Send, "abc"),
            secret
        );
        assert_ne!(
            HookKey::new(b"j".repeat(32)).secret(Hook::Send, "abc"),
            secret
        );
    }

    #[test]
    fn relay_proofs_name_their_channel_and_expire() {
        let key = HookKey::new(b"k".repeat(32));
        let proof = key.relay_proof_until("/ns/answer", 1000);
        assert!(key.verify_relay_at("/ns/answer", &proof, 999));
        assert!(key.verify_relay_at("/ns/answer", &proof, 1000));
        assert!(!key.verify_relay_at("/ns/answer", &proof, 1001));
        assert!(!key.verify_relay_at("/ns/other", &proof, 999));
        assert!(!key.verify_relay_at("/ns/answer", &proof.replacen("1000", "2000", 1), 999));
        assert!(!HookKey::new(b"x".repeat(32)).verify_relay_at("/ns/answer", &proof, 999));
        assert!(!key.verify_relay_at("/ns/answer", "junk", 0));
        // A hook secret is no relay proof, nor the other way round.
        let secret = key.secret(Hook::Send, "abc");
        assert!(!key.verify_relay_at("abc", &format!("0.{secret}"), 0));
    }

    #[test]
    fn minted_names_are_random() {
        let key = HookKey::generate().unwrap();
        let (a, b) = (key.mint(Hook::Send).unwrap(), key.mint(Hook::Send).unwrap());
        assert_ne!(a.name, b.name);
        assert!(key.verify(Hook::Send, &a.name, &a.secret));
    }
}
