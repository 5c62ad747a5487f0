//! webhook_outbox: transactional webhook delivery from inside PostgreSQL.
//!
//! The schema and most of the SQL API are plain SQL in `sql/outbox.sql`; this crate adds
//! what SQL cannot do well: validation with clear messages, secrets from the server's strong
//! random source, Standard Webhooks signing, the retry policy, and the GUCs that tune them.

use pgrx::prelude::*;

mod api;
mod errors;
mod guc;
mod wake;
mod worker;

::pgrx::pg_module_magic!(name, version);

// Emitted after every Rust function so that the SQL API can call them.
::pgrx::extension_sql_file!("../sql/outbox.sql", name = "outbox_schema", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    // SAFETY: a plain read of a PostgreSQL global on the main thread.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        guc::register_postmaster();
        wake::init_shared_memory();
        worker::register(guc::WORKERS.get());
    } else {
        log!(
            "webhook_outbox is loaded without shared_preload_libraries: the delivery worker is not \
             running, so deliveries queue up until shared_preload_libraries = 'webhook_outbox' is \
             set and the server restarted"
        );
    }
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
