//! Event ids that are not the caller's.

use sha2::{Digest, Sha256};

/// The `webhook-id` of an event that `outbox.trigger` appended to the log: derived from
/// where the event sits (its transaction id and its number within the transaction), the
/// time it was appended (microseconds) and the cluster's system identifier, so that every
/// read of the event, including one that repeats a batch after a crash, names it alike and
/// receivers can drop the repeat. The system identifier keeps ids apart across clusters (a
/// dump restored into a new cluster reuses transaction ids, not that identifier); the time
/// keeps them apart when a promoted standby hands out again transaction ids whose WAL never
/// reached it. Same shape as the ids `outbox.enqueue` makes up: `msg_` and 32 hex digits.
pub fn log_event_id(system_id: u64, txid: u64, seq: i64, created_us: i64) -> String {
    let mut h = Sha256::new();
    h.update(system_id.to_be_bytes());
    h.update(txid.to_be_bytes());
    h.update(seq.to_be_bytes());
    h.update(created_us.to_be_bytes());
    let digest = h.finalize();
    let mut id = String::with_capacity(36);
    id.push_str("msg_");
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_every_part_and_keep_their_shape() {
        let a = log_event_id(1, 2, 3, 4);
        assert_eq!(a, log_event_id(1, 2, 3, 4));
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("msg_"));
        assert!(a[4..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        for other in [
            log_event_id(9, 2, 3, 4),
            log_event_id(1, 9, 3, 4),
            log_event_id(1, 2, 9, 4),
            log_event_id(1, 2, 3, 9),
        ] {
            assert_ne!(a, other);
        }
    }
}
