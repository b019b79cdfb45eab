//! Random single-row changes over a model of which rows exist, for workload generators.

use super::prng::Prng;

/// Picks an insert (of `*next_id`), an update or a delete of one of `live`, updating the
/// model: an insert below `insert_below` percent or while fewer than `min_live` rows exist,
/// an update below `update_below`, else a delete. Returns the action and the row's id.
pub fn pick_change(
    rng: &mut Prng,
    live: &mut Vec<i32>,
    next_id: &mut i32,
    min_live: usize,
    (insert_below, update_below): (u64, u64),
) -> (&'static str, i32) {
    let r = rng.percent();
    if live.len() < min_live || r < insert_below {
        let id = *next_id;
        *next_id += 1;
        live.push(id);
        ("create", id)
    } else if r < update_below {
        ("update", live[rng.range(0, live.len() as u64 - 1) as usize])
    } else {
        let i = rng.range(0, live.len() as u64 - 1) as usize;
        ("delete", live.swap_remove(i))
    }
}
