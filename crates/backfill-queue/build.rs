//! `sqlx::migrate!` embeds the migrations at compile time but does not tell
//! cargo to rebuild when one is added or edited; this does.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
