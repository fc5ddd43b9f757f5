//! Probes through the read API: SQL that tries to leave the tenant's view (other tables,
//! URL tables, table functions, DDL, `COPY`, `SET`, predicates that widen the view, stacked
//! statements), runaway queries that would take acme's slots, and latest values of
//! another tenant.

use std::time::Duration;

use crate::Suite;
use crate::deployment::*;

pub(crate) async fn probes(d: &Deployment, s: &mut Suite) {
    s.probe(
        "sql",
        "mallory's SQL counts mallory's rows only, whatever the predicate",
        own_rows_only(d),
    )
    .await;
    let data = d.data().display().to_string();
    let escapes = [
        format!("SELECT * FROM '{data}'"),
        format!("SELECT * FROM '{data}/tenant=acme'"),
        format!("SELECT * FROM read_parquet('{data}/tenant=acme')"),
        format!("SELECT * FROM parquet_metadata('{data}')"),
        format!("CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '{data}/tenant=acme'"),
        format!("CREATE EXTERNAL TABLE x STORED AS DELTATABLE LOCATION '{data}'"),
        "COPY (SELECT * FROM readings) TO '/tmp/sluice-attack.parquet'".to_owned(),
        "CREATE TABLE x AS SELECT * FROM readings".to_owned(),
        "CREATE VIEW x AS SELECT 1".to_owned(),
        "INSERT INTO readings VALUES ('d', 'm', now(), 1.0, current_date)".to_owned(),
        "DELETE FROM readings".to_owned(),
        "DROP VIEW readings".to_owned(),
        "SET datafusion.catalog.information_schema = true".to_owned(),
        "SELECT * FROM information_schema.tables".to_owned(),
        "SHOW TABLES".to_owned(),
        "SELECT 1; DROP VIEW readings".to_owned(),
        "SELECT count(*) FROM acme.readings".to_owned(),
        "SELECT count(*) FROM \"tenant=acme\"".to_owned(),
        "SELECT count(*) FROM datafusion.public.readings_table".to_owned(),
    ];
    for sql in escapes {
        s.probe("sql", format!("`{sql}` is refused"), refused(d, sql))
            .await;
    }
    s.probe(
        "sql",
        "mallory's runaway queries leave acme's queries answered",
        runaway_queries(d),
    )
    .await;
    s.probe(
        "cross-tenant",
        "mallory's latest values hold mallory's devices only",
        latest_is_per_tenant(d),
    )
    .await;
}

async fn own_rows_only(d: &Deployment) {
    let acme = d.rows("acme", "SELECT count(*) FROM readings").await;
    assert!(acme > 0, "acme has rows to leak");
    // Everything mallory was answered 202 for is stored, so its count stands still.
    let accepted = d.mallory_accepted.load(std::sync::atomic::Ordering::SeqCst);
    let settled = sluice_testkit::wait::until(Duration::from_secs(30), || async {
        (d.rows("mallory", "SELECT count(*) FROM readings").await == accepted).then_some(())
    })
    .await;
    assert!(settled.is_some(), "mallory's {accepted} readings stored");
    let mallory = accepted;
    for (sql, want) in [
        ("SELECT count(*) AS n FROM readings", mallory),
        (
            "SELECT count(*) AS n FROM readings WHERE 1 = 1 OR device LIKE 'acme-%'",
            mallory,
        ),
        (
            "SELECT count(*) AS n FROM readings WHERE device LIKE 'acme-%'",
            0,
        ),
        (
            "SELECT count(*) AS n FROM (SELECT * FROM readings UNION ALL SELECT * FROM readings WHERE device NOT LIKE 'm-%')",
            mallory,
        ),
    ] {
        let (status, body) = d.sql(MALLORY, sql).await;
        assert_eq!(status, 200, "{sql}: {body}");
        assert_eq!(body["rows"][0]["n"], want, "{sql}: {body}");
    }
}

async fn refused(d: &Deployment, sql: String) {
    let (status, body) = d.sql(MALLORY, &sql).await;
    assert!((400..500).contains(&status), "{status}: {body}");
    assert!(!body.to_string().contains("acme-"), "{body}");
    assert!(
        !std::path::Path::new("/tmp/sluice-attack.parquet").exists(),
        "COPY wrote a file"
    );
}

async fn runaway_queries(d: &Deployment) {
    let heavy = "SELECT count(*) AS n FROM generate_series(1, 100000000000) a";
    let runaways: Vec<_> = (0..4).map(|_| d.sql(MALLORY, heavy)).collect();
    let victim = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.sql(ACME, "SELECT count(*) AS n FROM readings").await
    };
    let (results, (status, body)) = futures::join!(futures::future::join_all(runaways), victim);
    assert_eq!(status, 200, "acme's query beside mallory's: {body}");
    for (status, body) in &results {
        assert!(
            [408, 413, 429].contains(status),
            "a runaway query: {status} {body}"
        );
    }
    assert!(
        results.iter().any(|(s, _)| *s == 429),
        "mallory ran 4 queries at once: {results:?}"
    );
}

async fn latest_is_per_tenant(d: &Deployment) {
    for query in ["?limit=10000", "?device=acme-*", "?device=*"] {
        let (status, body) = d.latest(MALLORY, query).await;
        assert_eq!(status, 200, "{body}");
        for dev in body["devices"].as_array().unwrap() {
            let name = dev["device"].as_str().unwrap();
            assert!(name.starts_with("m-"), "{query}: mallory sees {name}");
        }
    }
}
