//! `pause`, `resume`, `cancel` and `retry`: the steering functions of the SQL interface.

use backfill_queue::SteeringVerb;
use sqlx::PgPool;

use super::CliFailure;

/// Applies `verb` to job `name` and prints the state it is in now.
pub async fn steer(pool: &PgPool, verb: SteeringVerb, name: &str) -> Result<(), CliFailure> {
    let state = verb.apply(pool, name).await?;
    println!("job {name}: {state}");
    Ok(())
}
