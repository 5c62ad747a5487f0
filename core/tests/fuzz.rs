//! Generated input against every parser and validator: 10,000 cases each. None may panic,
//! and each answer must be consistent with itself (accepted values stay accepted when
//! checked again; refusals carry a message).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use outbox_core::outcome::{classify, decide, parse_retry_after, Response};
use outbox_core::retry::RetrySchedule;
use outbox_core::signing::SigningKey;
use outbox_core::ssrf::{self, AllowList};
use outbox_core::validate;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Mostly-plausible text mixed with arbitrary Unicode, so both paths get exercised.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z]{1,8}(\\.[a-z*]{1,8}){0,3}",
        "https?://[a-zA-Z0-9.:@\\[\\]/?#%_-]{0,40}",
        "whsec_[A-Za-z0-9+/=]{0,90}",
        "[0-9]{1,4}(ms|s|m|h|d| s|x)?(, ?[0-9]{1,3}(ms|s|m|h|d))*",
        "[0-9./a-f:]{1,40}(/[0-9]{1,3})?(, ?[a-z.]{1,10})?",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn validators_never_panic_and_are_stable(text in texty()) {
        if let Ok(url) = validate::endpoint_url(&text) {
            // The stored (normalized) form is itself acceptable and stable.
            prop_assert_eq!(validate::endpoint_url(&url), Ok(url.clone()));
            let _ = validate::endpoint_target(&url, &AllowList::default());
        }
        for r in [validate::event_type(&text), validate::event_id(&text), validate::tenant_id(&text)] {
            if let Err(e) = r {
                prop_assert!(!e.message().is_empty());
            }
        }
        if validate::event_id(&text).is_ok() {
            prop_assert!(!text.contains('.'), "ids are part of the signed content and must not contain '.'");
        }
        let _ = validate::event_filter(&[Some(text.clone()), None]);
        let _ = validate::event_filter(&[Some(text.clone())]);
    }

    #[test]
    fn schedules_allow_lists_and_secrets_never_panic(text in texty()) {
        if let Ok(s) = RetrySchedule::parse(&text) {
            for (i, d) in s.delays().iter().enumerate() {
                let got = s.delay_after(i as u32 + 1, 1.0).unwrap();
                prop_assert!(got >= *d && got <= d.mul_f64(1.2) + Duration::from_nanos(1));
            }
        }
        if let Ok(list) = AllowList::parse(&text) {
            let _ = ssrf::check("h", "127.0.0.1".parse().unwrap(), &list);
        }
        if let Ok(key) = SigningKey::parse(&text) {
            prop_assert_eq!(SigningKey::parse(&key.to_secret()).map(|k| k.to_secret()), Ok(key.to_secret()));
        }
        let _ = parse_retry_after(&text, SystemTime::now());
    }

    #[test]
    fn headers_accept_only_safe_objects(obj in proptest::collection::btree_map(texty(), texty(), 0..5)) {
        let value = serde_json::Value::Object(obj.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect());
        if validate::headers(&value).is_ok() {
            for (k, v) in &obj {
                prop_assert!(!k.is_empty() && k.is_ascii());
                prop_assert!(!v.contains('\r') && !v.contains('\n') && !v.contains('\0'));
            }
        }
    }

    #[test]
    fn every_address_gets_a_verdict(bytes in any::<[u8; 16]>(), v4 in any::<[u8; 4]>()) {
        for ip in [IpAddr::from(bytes), IpAddr::from(v4)] {
            let forbidden = ssrf::forbidden_reason(ip).is_some();
            prop_assert_eq!(ssrf::check("h", ip, &AllowList::default()).is_err(), forbidden);
        }
    }

    #[test]
    fn every_status_is_classified(code in 0u16..1000, attempt in 0u32..20, after in texty()) {
        let response = Response::Status { code, retry_after: Some(after) };
        let d = decide(&response, attempt, &RetrySchedule::default(), SystemTime::now());
        prop_assert_eq!(d.class, classify(&response));
        if let Some(wait) = d.retry_after {
            prop_assert!(wait <= outbox_core::outcome::MAX_RETRY_AFTER);
        }
    }
}
