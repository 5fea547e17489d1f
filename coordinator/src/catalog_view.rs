//! The network catalog as clients see it: Arrow schemas whose metadata says
//! which tables are private, which column is the privacy unit, and each
//! column's declared bounds and public domain. Never row counts or values.

use std::collections::HashMap;

use arrow::datatypes::{Field, Schema};
use confer_protocol::catalog::TableInfo;

/// Schema metadata key: `private` or `public`.
pub const TABLE_KIND: &str = "confer.table_kind";
/// Field metadata key: `"true"` on the privacy unit column.
pub const PRIVACY_UNIT: &str = "confer.privacy_unit";
/// Field metadata key: declared bounds, `lo,hi`.
pub const BOUNDS: &str = "confer.bounds";
/// Field metadata key: the public domain, as JSON.
pub const DOMAIN: &str = "confer.domain";

/// The Arrow schema of a catalog table, with confer's metadata.
pub fn table_schema(table: &TableInfo) -> Schema {
    let fields: Vec<Field> = table
        .columns
        .iter()
        .map(|c| {
            let mut meta = HashMap::new();
            if table.privacy_unit.as_deref() == Some(c.name.as_str()) {
                meta.insert(PRIVACY_UNIT.to_string(), "true".to_string());
            }
            if let Some((lo, hi)) = c.bounds {
                meta.insert(BOUNDS.to_string(), format!("{lo},{hi}"));
            }
            if let Some(d) = &c.domain
                && let Ok(json) = serde_json::to_string(d)
            {
                meta.insert(DOMAIN.to_string(), json);
            }
            Field::new(&c.name, c.column_type.arrow_type(), true).with_metadata(meta)
        })
        .collect();
    let kind = if table.is_private() {
        "private"
    } else {
        "public"
    };
    Schema::new_with_metadata(
        fields,
        HashMap::from([(TABLE_KIND.to_string(), kind.to_string())]),
    )
}
