# `make run`'s script starts, serves through the library, prints its URLs - each of which answers while it runs,
# Prometheus metrics included - prints the admin token as a usable `export` line, and stops everything it started.
# Fixed ports (the demo backends on 9001-9003): run under flock /tmp/autoscale-fixed-ports.lock.
use strict;
use warnings;
use Test::More;
use HTTP::Tiny;

my $port = 18000 + ($$ % 1000);
my $pid = open(my $demo, '-|', "DEMO_DURATION=8 DEMO_REPORT_EVERY=0 PORT=$port exec scripts/demo 2>&1")
    or die "scripts/demo: $!";
my $out = '';
while (my $line = <$demo>) {
    $out .= $line;
    last if $line =~ /^Ctrl-C to stop/;
}

# While it runs: every URL it printed answers.
my %url;
for my $name ('gateway', 'status', 'dashboard', 'metrics', 'admin API') {
    ($url{$name}) = $out =~ /^  \Q$name\E\s+(http:\/\/\S+)/m;
    like($url{$name} // '', qr{^http://127\.0\.0\.1:$port/}, "prints the $name URL");
}
is($url{status}, "http://127.0.0.1:$port/autoscale/status", 'status URL');
is($url{dashboard}, "http://127.0.0.1:$port/autoscale/dashboard", 'dashboard URL');
is($url{metrics}, "http://127.0.0.1:$port/autoscale/metrics", 'metrics URL');
my ($export) = $out =~ /^\s*(export AUTOSCALE_ADMIN_TOKEN=\S+)$/m;
ok($export, 'prints the admin token as an export line');
my $token = $export ? `sh -c '$export; printf %s "\$AUTOSCALE_ADMIN_TOKEN"'` : '';
like($token, qr/^[\w-]{16,}$/, 'the export line sets AUTOSCALE_ADMIN_TOKEN in a shell');

my $http = HTTP::Tiny->new(timeout => 5);
my %want = (
    gateway   => qr/"backend"/,
    status    => qr/"upstreams"/,
    dashboard => qr/<html/i,
    metrics   => qr/^autoscale_\w+\{[^}]*upstream="backend"[^}]*\} \d/m,
);
for my $name (sort keys %want) {
    my $r = $http->get($url{$name} // 'http://127.0.0.1:1/');
    is($r->{status}, 200, "$name URL answers 200");
    like($r->{content}, $want{$name}, "$name URL answers with its content");
}
my $r = $http->get($url{'admin API'} // 'http://127.0.0.1:1/');
is($r->{status}, 401, 'admin API URL without the token: 401');
$r = $http->get($url{'admin API'} // 'http://127.0.0.1:1/', { headers => { Authorization => "Bearer $token" } });
is($r->{status}, 200, 'admin API URL with the printed token: 200');
like($r->{content}, qr/"peers"/, 'admin API answers with the upstream');
my @gets = $out =~ /(curl (?:-s|-i) (?:-H "[^"]*" )?http:\/\/127\.0\.0\.1:$port\/\S*)/g;
cmp_ok(scalar(@gets), '>=', 4, 'prints curl commands for its URLs');
for my $cmd (@gets) {
    my $code = `sh -c '$export; $cmd -s -o /dev/null -w "%{http_code}"' 2>&1`;
    is($code, '200', "printed command answers 200: $cmd");
}

$out .= $_ while <$demo>;
close $demo;
my $rc = $? >> 8;
is($rc, 0, 'demo exits 0 after DEMO_DURATION') or diag($out);
like($out, qr{GET http://127\.0\.0\.1:$port/ -> 200}, 'the gateway answered 200 through the library');
like($out, qr{GET http://127\.0\.0\.1:$port/autoscale/metrics -> 200\n}, 'smoke check: metrics');
like($out, qr{GET http://127\.0\.0\.1:$port/autoscale/dashboard -> 200\n}, 'smoke check: dashboard');
like($out, qr{GET http://127\.0\.0\.1:$port/autoscale/admin/upstreams/backend without a token -> 401}, 'the admin API refuses no token');
like($out, qr{GET http://127\.0\.0\.1:$port/autoscale/admin/upstreams/backend with the token -> 200}, 'the admin API answers with the token');
like($out, qr{smoke check: OK}, 'smoke check passed');
unlike($out, qr{not built yet}, 'no stale line about the dashboard');
my $left = `ps -eo args | grep -F '.run/demo' | grep -v grep`;
is($left, '', 'nothing left running');
done_testing();
