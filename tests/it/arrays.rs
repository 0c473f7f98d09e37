//! The array decoder against real `array_agg` results: what it reads equals what sqlx reads.

use sqlx::Row;
use wazzup_sync::db::arrays::{bools, int8s, texts};

use crate::helpers::*;

/// The grouped-read shapes: NULLs among the elements, an empty array, a NULL array, non-ASCII
/// and astral-plane text, quotes and backslashes, and an array of 10,000 elements.
const ARRAYS: &str = "
    SELECT g AS id,
           array_agg(CASE WHEN i % 7 = 0 THEN NULL
                          ELSE 'Jānis \"JB\" \\ Bērziņš 😀 ' || i END ORDER BY i) AS names,
           array_agg(CASE WHEN i % 5 = 0 THEN NULL ELSE i % 2 = 0 END ORDER BY i) AS flags,
           array_agg(CASE WHEN i % 3 = 0 THEN NULL ELSE i::int8 * 1000000007 - 5 END ORDER BY i) AS hashes
    FROM (SELECT g, i FROM generate_series(1, 3) AS g,
                 LATERAL generate_series(1, CASE g WHEN 1 THEN 10000 WHEN 2 THEN 1 ELSE 10 END) AS i) AS x
    GROUP BY g
    UNION ALL SELECT 4, '{}'::text[], '{}'::bool[], '{}'::int8[]
    UNION ALL SELECT 5, NULL::text[], NULL::bool[], NULL::int8[]
    ORDER BY 1";

#[tokio::test]
async fn the_decoder_reads_real_arrays_as_sqlx_does() {
    let db = TestDb::new().await;
    let rows = sqlx::query(ARRAYS).fetch_all(&db.pool).await.unwrap();
    assert_eq!(rows.len(), 5);
    let mut elements = 0;
    for row in &rows {
        let id: i32 = row.get("id");
        let by_sqlx: Option<Vec<Option<String>>> = row.get("names");
        let by_sqlx = by_sqlx.unwrap_or_default();
        assert_eq!(texts::<String>(row, 1).unwrap(), by_sqlx, "names of {id}");
        let flags: Option<Vec<Option<bool>>> = row.get("flags");
        assert_eq!(
            bools(row, 2).unwrap(),
            flags.unwrap_or_default(),
            "flags of {id}"
        );
        let hashes: Option<Vec<Option<i64>>> = row.get("hashes");
        assert_eq!(
            int8s(row, 3).unwrap(),
            hashes.unwrap_or_default(),
            "hashes of {id}"
        );
        elements += by_sqlx.len();
    }
    assert_eq!(elements, 10_011, "every element was compared");
    let big = texts::<String>(&rows[0], 1).unwrap();
    assert_eq!(big[1].as_deref(), Some("Jānis \"JB\" \\ Bērziņš 😀 2"));
    assert_eq!(big[6], None);
}

#[tokio::test]
async fn an_array_of_another_type_is_an_error_naming_the_column() {
    let db = TestDb::new().await;
    let row = sqlx::query("SELECT ARRAY[1, 2]::int4[] AS ids, ARRAY['a']::varchar[] AS names")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let err = int8s(&row, 0).unwrap_err().to_string();
    assert!(err.contains("column 0 (ids)"), "{err}");
    let err = texts::<String>(&row, 1).unwrap_err().to_string();
    assert!(err.contains("column 1 (names)"), "{err}");
}
