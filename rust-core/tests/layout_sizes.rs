//! The region sizes that docs/operations.md ("Shared-memory sizing") lists are the sizes `Layout::new` computes (what
//! status reports as `region.size_bytes`): every row of its table is parsed and checked, so the table cannot drift.

use autoscale_core::layout::Layout;
use autoscale_core::Params;

const DOC: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/operations.md"
));

/// `max_peers = 4096, max_workers = 8` or `window = { buckets = 60 }` -> the parameters (others default).
fn params(cell: &str) -> Params {
    let mut p = Params::default();
    if cell.starts_with("defaults") {
        return p;
    }
    let text: String = cell.split(" (").next().unwrap_or("").replace('`', "");
    for part in text.split(", ") {
        let (key, value) = part
            .split_once(" = ")
            .unwrap_or_else(|| panic!("not `key = value`: {part:?}"));
        let number = |v: &str| {
            v.trim()
                .parse::<u32>()
                .unwrap_or_else(|_| panic!("not a number: {v:?}"))
        };
        match key.trim() {
            "max_upstreams" => p.max_upstreams = number(value),
            "max_peers" => p.max_peers = number(value),
            "max_workers" => p.max_workers = number(value),
            "admission_rate_slots" => p.rate_slots = number(value),
            "window" => {
                let inner = value.trim().trim_start_matches('{').trim_end_matches('}');
                let (k, v) = inner.split_once(" = ").expect("window = { buckets = n }");
                assert_eq!(k.trim(), "buckets", "only window.buckets changes the size");
                p.window_buckets = number(v);
            }
            other => panic!("unknown option in the table: {other}"),
        }
    }
    p
}

#[test]
fn documented_region_sizes_are_the_computed_ones() {
    let start = DOC
        .find("| configuration (everything else default) | region bytes |")
        .expect("the sizing table");
    let rows: Vec<&str> = DOC[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(rows.len() >= 8, "rows of the table: {}", rows.len());
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 2, "two cells: {row}");
        let p = params(cells[0]);
        p.validate().unwrap_or_else(|e| panic!("{row}: {e}"));
        let documented: usize = cells[1]
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("bytes: {row}"));
        assert_eq!(Layout::new(p).total, documented, "{row}");
    }
}
