#!/usr/bin/env bash
# An Incentives workload for deploy/compose: seeds 5000 couriers once, then updates a few
# couriers' performance every 100 ms, as the Incentives service would.
set -euo pipefail
PGPASSWORD="$(cat "$PGPASSFILE_SOURCE")"
export PGPASSWORD
psql -v ON_ERROR_STOP=1 -q <<'SQL'
INSERT INTO courier_performance (courier_id, city, zone, tier, rating, deliveries, on_time_rate, acceptance_rate)
SELECT id, (ARRAY['lisbon', 'porto', 'madrid', 'berlin'])[1 + id % 4], 'zone-' || (id % 40),
       (ARRAY['bronze', 'silver', 'gold', 'platinum'])[1 + id % 4], 3 + (id % 200) / 100.0,
       id % 900, 0.80 + (id % 20) / 100.0, 0.90
FROM generate_series(1, 5000) AS id
ON CONFLICT (courier_id) DO NOTHING;
SQL
echo "workload: seeded; updating couriers every 100 ms"
while true; do
  psql -v ON_ERROR_STOP=1 -q -c "
    UPDATE courier_performance
       SET deliveries = deliveries + 1,
           on_time_rate = least(1.0, greatest(0.0, on_time_rate + (random() - 0.5) / 50)),
           updated_at = now()
     WHERE courier_id IN (SELECT 1 + floor(random() * 5000)::bigint FROM generate_series(1, 5))"
  sleep 0.1
done
