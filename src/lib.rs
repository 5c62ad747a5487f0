//! webhook_outbox: transactional webhook delivery from inside PostgreSQL.
//!
//! The schema and most of the SQL API are plain SQL in `sql/outbox/`; this crate adds
//! what SQL cannot do well: validation with clear messages, secrets from the server's strong
//! random source, Standard Webhooks signing, the retry policy, and the GUCs that tune them.

use pgrx::prelude::*;

mod api;
mod errors;
mod guc;
mod log;
mod wake;
mod worker;

::pgrx::pg_module_magic!(name, version);

// The schema and SQL API in data-path order, each file after the one before it; the last
// after everything else (its REVOKE covers the Rust functions too).
::pgrx::extension_sql_file!("../sql/outbox/01_tables.sql", name = "outbox_tables");
::pgrx::extension_sql_file!(
    "../sql/outbox/02_rules.sql",
    name = "outbox_rules",
    requires = ["outbox_tables"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/03_announcements.sql",
    name = "outbox_announcements",
    requires = ["outbox_rules"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/04_endpoints.sql",
    name = "outbox_endpoints",
    requires = ["outbox_announcements"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/05_enqueue.sql",
    name = "outbox_enqueue",
    requires = ["outbox_endpoints"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/06_read_log.sql",
    name = "outbox_read_log",
    requires = ["outbox_enqueue"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/07_claim_ack.sql",
    name = "outbox_claim_ack",
    requires = ["outbox_read_log"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/08_views.sql",
    name = "outbox_views",
    requires = ["outbox_claim_ack"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/09_statistics.sql",
    name = "outbox_statistics",
    requires = ["outbox_views"]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/10_repair.sql",
    name = "outbox_repair",
    requires = ["outbox_statistics"]
);
// After the Rust functions it describes too.
::pgrx::extension_sql_file!(
    "../sql/outbox/12_comments.sql",
    name = "outbox_comments",
    requires = [
        "outbox_repair",
        api::generate_secret,
        api::sign,
        api::retry_delay
    ]
);
::pgrx::extension_sql_file!(
    "../sql/outbox/11_privileges.sql",
    name = "outbox_privileges",
    finalize
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    // SAFETY: a plain read of a PostgreSQL global on the main thread.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        guc::register_postmaster();
        wake::init_shared_memory();
        worker::launcher::register();
    } else {
        log!(
            "webhook_outbox is loaded without shared_preload_libraries: the delivery worker is not \
             running, so deliveries queue up until shared_preload_libraries = 'webhook_outbox' is \
             set and the server restarted"
        );
    }
    guc::reserve_prefix();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
