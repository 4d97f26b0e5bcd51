# What can be checked of the Docker image without Docker: the Dockerfile's base images are pinned to exact versions,
# every COPY source exists in the repository, the library is built stripped, the image's default configuration is
# examples/nginx.conf; and examples/nginx.conf itself, installed with `make install` into a scratch prefix, runs under
# the test nginx (paths, ports and Debian's load_module lines adjusted) with gateway, status, metrics and dashboard.
use strict;
use warnings;
use lib 't/lib';
use Test::More;
use ScratchNginx qw(scratch_dir temp_paths start_nginx stop_nginx http_get repo_root);

my $repo = repo_root();
my $port = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
my ($status_port, $b1, $b2) = ($port + 5, $port + 6, $port + 7);

my $dockerfile = ScratchNginx::slurp("$repo/Dockerfile");
ok(length $dockerfile, 'Dockerfile is there');

my @from = $dockerfile =~ /^FROM\s+(\S+)/mg;
ok(@from >= 2, 'a builder stage and a runtime stage');
for my $image (@from) {
    like($image, qr{^[\w./-]+:[\w.-]*\d+\.\d+\.\d+[\w.-]*(?:\@sha256:[0-9a-f]{64})?$},
        "base image $image is pinned to an exact version");
    unlike($image, qr{:(?:latest|\d+(?:-\w+)?)(?:\@|$)}, "base image $image is not a moving tag");
}

my @copies = $dockerfile =~ /^COPY\s+(?!--from)(.+)$/mg;
ok(@copies, 'COPY lines from the build context');
for my $line (@copies) {
    my @args = split ' ', $line;
    pop @args;    # the destination
    ok(-e "$repo/$_", "COPY source $_ exists") for @args;
}
like($dockerfile, qr{^COPY\s+examples/nginx\.conf\s+/usr/local/openresty/nginx/conf/nginx\.conf$}m,
    'the image uses examples/nginx.conf as its nginx.conf');
like($dockerfile, qr{CARGO_PROFILE_RELEASE_STRIP=true|\bstrip\b.*libresty_autoscale\.so}, 'the library is stripped');
like($dockerfile, qr{^COPY --from=\w+ \S*/target/release/libresty_autoscale\.so /usr/local/openresty/site/lualib/$}m,
    'the library goes onto OpenResty\'s default lua_package_cpath');

my $readme = ScratchNginx::slurp("$repo/README.md");
ok($readme =~ qr{^docker run .*-p 8080:8080 .*-p 127\.0\.0\.1:9145:9145 .*resty-autoscale}m,
    'README documents docker run with both ports');
ok($readme =~ qr{not (?:been )?(?:run|built) in CI}i, 'README says the image build is not run in CI');

# The example configuration under the test nginx, from a `make install` prefix.
my $root = scratch_dir('docker-prefix');
my $out = `cd '$repo' && make -s install DESTDIR='$root' PREFIX=/usr/local/openresty/site 2>&1`;
is($? >> 8, 0, 'make install into a scratch prefix') or diag($out);
my $lua_dir = "$root/usr/local/openresty/site/share/lua/5.1";
my $clib_dir = "$root/usr/local/openresty/site/lib/lua/5.1";

my $dir = scratch_dir('docker-conf');
my $conf = ScratchNginx::slurp("$repo/examples/nginx.conf");
my %n;
$n{lua_path}  = $conf =~ s{(lua_package_path\s+")/usr/local/openresty/site/lualib/}{$1$lua_dir/}g;
$n{lua_cpath} = $conf =~ s{(lua_package_cpath\s+")/usr/local/openresty/site/lualib/}{$1$clib_dir/}g;
$n{gateway}   = $conf =~ s{\blisten 8080;}{listen 127.0.0.1:$port;}g;
$n{status}    = $conf =~ s{\blisten 9145;}{listen 127.0.0.1:$status_port;}g;
$n{backend1}  = $conf =~ s{127\.0\.0\.1:8081\b}{127.0.0.1:$b1}g;
$n{backend2}  = $conf =~ s{127\.0\.0\.1:8082\b}{127.0.0.1:$b2}g;
$n{http}      = $conf =~ s#^http \{\n#"http {\n    access_log $dir/logs/access.log;\n" . temp_paths($dir)#me;
$n{workers}   = $conf =~ s{^worker_processes auto;}{worker_processes 2;}m;
is_deeply([grep { !$n{$_} } sort keys %n], [], 'examples/nginx.conf takes every adjustment');
$conf = join('', map { "load_module $_;\n" } @ScratchNginx::MODULES)
    . "pid $dir/logs/nginx.pid;\nerror_log $dir/logs/error.log info;\n$conf";

my ($pid, $err) = start_nginx($dir, $conf);
ok($pid, 'nginx starts with examples/nginx.conf') or diag($err);
if ($pid) {
    my (%codes, %served);
    for (1 .. 20) {
        my $r = http_get("http://127.0.0.1:$port/");
        $codes{$r->{status}}++;
        $served{$1}++ if $r->{status} == 200 && $r->{content} =~ /^demo backend (\d+)/;
    }
    is_deeply(\%codes, { 200 => 20 }, 'the gateway answers 200');
    my $n_served = 0;
    $n_served += $_ for values %served;
    is($n_served, 20, 'each answer came from a demo backend') or diag(explain(\%served));
    my $st = http_get("http://127.0.0.1:$status_port/autoscale/status");
    is($st->{status}, 200, 'status answers 200');
    like($st->{content}, qr{"app"}, 'the status names the upstream');
    my $m = http_get("http://127.0.0.1:$status_port/metrics");
    is($m->{status}, 200, 'metrics answer 200');
    like($m->{content}, qr/^autoscale_\w+\{[^}]*upstream="app"[^}]*\} \d/m, 'metrics have the upstream app');
    my $d = http_get("http://127.0.0.1:$status_port/autoscale/dashboard");
    is($d->{status}, 200, 'dashboard answers 200');
    like($d->{content}, qr{<html}i, 'the dashboard is HTML');
    ok(stop_nginx($pid), "nginx stopped (pid $pid)");
    my $log = ScratchNginx::slurp("$dir/logs/error.log");
    unlike($log, qr{\[(?:error|crit|alert|emerg)\]}, 'no error in the error log')
        or diag(join "\n", grep { /\[(?:error|crit|alert|emerg)\]/ } split /\n/, $log);
}
done_testing();
