# `make run`'s script starts, serves through the library, prints its URLs, and stops everything it started.
use strict;
use warnings;
use Test::More;

my $port = 18000 + ($$ % 1000);
my $out = `DEMO_DURATION=4 PORT=$port scripts/demo 2>&1`;
my $rc = $? >> 8;
is($rc, 0, 'demo exits 0 after DEMO_DURATION') or diag($out);
like($out, qr{gateway\s+http://127\.0\.0\.1:$port/}, 'prints the gateway URL');
like($out, qr{status\s+http://127\.0\.0\.1:$port/autoscale/status}, 'prints the status URL');
like($out, qr{dashboard\s+http://127\.0\.0\.1:$port/autoscale/dashboard}, 'prints the dashboard URL');
like($out, qr{GET http://127\.0\.0\.1:$port/ -> 200}, 'the gateway answered 200 through the library');
like($out, qr{admin API\s+http://127\.0\.0\.1:$port/autoscale/admin}, 'prints the admin API URL');
like($out, qr{GET http://127\.0\.0\.1:$port/autoscale/admin/upstreams/backend without a token -> 401}, 'the admin API refuses no token');
like($out, qr{GET http://127\.0\.0\.1:$port/autoscale/admin/upstreams/backend with the token -> 200}, 'the admin API answers with the token');
like($out, qr{smoke check: OK}, 'smoke check passed');
my $left = `ps -eo args | grep -F '.run/demo' | grep -v grep`;
is($left, '', 'nothing left running');
done_testing();
