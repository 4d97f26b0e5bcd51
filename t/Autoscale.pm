package Autoscale;

# The project's test module for t/*.t (Test::Nginx::Socket::Lua format):
#
#     use lib 't';
#     use Autoscale;
#
# It runs the tests with Test::Nginx::Socket::Lua when that is installed and
# env AUTOSCALE_MINI_RUNNER is unset, else with the bundled t/Autoscale/Runner.pm,
# and exports the same functions either way. See the POD below.

use strict;
use warnings;

use Cwd ();
use File::Basename ();

our $Repo = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/..');

my $Debian_nginx   = '/usr/sbin/nginx';
my @Debian_modules = map { "/usr/lib/nginx/modules/$_.so" }
    qw(ndk_http_module ngx_http_lua_module);    # NDK must come first

our $Backend = !$ENV{AUTOSCALE_MINI_RUNNER} && grep({ -f "$_/Test/Nginx/Socket/Lua.pm" } @INC)
    ? 'Test::Nginx::Socket::Lua' : 'Autoscale::Runner';

# Both runners read these when they are loaded. The real Test::Nginx runs
# Debian's nginx through t/Autoscale/nginx so that startup errors land in
# logs/error.log as with OpenResty (the mini runner reads nginx's stderr).
if (-x $Debian_nginx && !$ENV{TEST_NGINX_BINARY}) {
    $ENV{TEST_NGINX_BINARY} = $Backend eq 'Autoscale::Runner'
        ? $Debian_nginx : "$Repo/t/Autoscale/nginx";
}
$ENV{TEST_NGINX_LOAD_MODULES} //= "@Debian_modules" if !grep { !-f } @Debian_modules;

# AUTOSCALE_NATIVE=1: the suites run against native upstreams (`autoscale NAME;`, ngx_http_autoscale_module from
# target/release, loaded after the Lua module) instead of balancer_by_lua; see docs/native-module.md.
our $Native = $ENV{AUTOSCALE_NATIVE} ? 1 : 0;
our $Native_module = ($ENV{AUTOSCALE_NATIVE_MODULE} || "$Repo/target/release/ngx_http_autoscale_module.so");
if ($Native) {
    die "AUTOSCALE_NATIVE=1 but $Native_module is missing (make build)\n" unless -f $Native_module;
    $ENV{TEST_NGINX_LOAD_MODULES} .= " $Native_module"
        unless ($ENV{TEST_NGINX_LOAD_MODULES} // '') =~ /ngx_http_autoscale_module/;
}
$ENV{TEST_NGINX_REPO} = $Repo;

eval "require $Backend; 1" or die $@;

# Test::Nginx before 0.31 writes no *_temp_path directives (see below).
our $Old_test_nginx = $Backend ne 'Autoscale::Runner'
    && !eval { Test::Nginx::Util->VERSION(0.31); 1 };

sub _backend_fn { $Backend->can($_[0]) or die "$Backend has no $_[0]()\n" }

$ENV{TEST_NGINX_HTML_DIR} ||= _backend_fn('html_dir')->();

# Project defaults, prepended to every block's http_config: the project's Lua
# modules and Rust library, each unless the block sets that directive itself
# or has a "--- no_autoscale_defaults" section. The same paths also go into
# env LUA_PATH/LUA_CPATH, which is what ";;" in a block's own
# lua_package_(c)path stands for. Preprocessors run just before each block's
# nginx starts, with either runner.
my $Lua_path  = "$Repo/lua/?.lua;$Repo/lua/?/init.lua;$Repo/t/lib/?.lua;";
my $Lua_cpath = ($ENV{AUTOSCALE_LIB_DIR} || "$Repo/target/release") . "/lib?.so;";
my %Lua_env   = (LUA_PATH => $ENV{LUA_PATH}, LUA_CPATH => $ENV{LUA_CPATH});

_backend_fn('add_block_preprocessor')->(sub {
    my $block = shift;
    my $http = $block->http_config // '';
    my $pre = '';
    if ($Old_test_nginx) {
        # Debian's nginx has no usable default temp paths. Test::Nginx 0.31
        # and later write all five *_temp_path directives, as the bundled
        # runner does; an older Test::Nginx writes none.
        my $root = _backend_fn('server_root')->();
        for my $t (qw(client_body proxy fastcgi uwsgi scgi)) {
            $pre .= "    ${t}_temp_path $root/${t}_temp;\n" unless $http =~ /\b${t}_temp_path\b/;
        }
    }
    for my $var (keys %Lua_env) {
        if (defined $Lua_env{$var}) { $ENV{$var} = $Lua_env{$var} } else { delete $ENV{$var} }
    }
    if (!defined $block->no_autoscale_defaults) {
        $ENV{LUA_PATH}  = $Lua_path  . ($Lua_env{LUA_PATH}  // ';');
        $ENV{LUA_CPATH} = $Lua_cpath . ($Lua_env{LUA_CPATH} // ';');
        $pre .= qq{    lua_package_path "$Lua_path;";\n}   unless $http =~ /\blua_package_path\b/;
        $pre .= qq{    lua_package_cpath "$Lua_cpath;";\n} unless $http =~ /\blua_package_cpath\b/;
    }
    $block->set_value(http_config => $pre . $http) if $pre ne '';
});

# gateway_upstream($peers, $opts): the http_config lines of a gateway whose
# upstream "backend" is balanced by resty.autoscale: init_by_lua* configuring it
# with the Lua peer list $peers and the Lua option text $opts, init_worker_by_lua*,
# and the upstream block (keepalive 32). The suites add their backends and server.
sub gateway_upstream {
    my ($peers, $opts) = @_;
    return <<"_EOC_";
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { $peers }, $opts } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        @{[ $Native ? 'autoscale backend;' : 'balancer_by_lua_block { autoscale.balance("backend") }' ]}
        keepalive 32;
    }
_EOC_
}

# trace_variables(): the `set` lines that declare the four $autoscale_* variables autoscale.trace() fills.
sub trace_variables {
    return join '', map { qq{    set \$autoscale_$_ "";\n} } qw(peer attempt cost trace);
}

# with_trace($text, $lua): $text with its TRACE placeholder replaced by the Lua code $lua (e.g. 'autoscale.trace()').
sub with_trace {
    my ($text, $lua) = @_;
    $text =~ s/TRACE/$lua/;
    return $text;
}

sub import {
    my ($class, @args) = @_;
    my $caller = caller;
    my $base = $Backend;
    no strict 'refs';
    *{"${caller}::$_"} = \&{"Autoscale::$_"} for qw(gateway_upstream trace_variables with_trace);
    if ($Backend eq 'Autoscale::Runner') {
        *{"${caller}::$_"} = \&{"Autoscale::Runner::$_"}
            for grep { $_ ne 'run_tests' } @Autoscale::Runner::EXPORT;
        $base = 'Test::Base';
    }
    # A file without a plan counts its tests as they run, with either runner
    # (Test::Nginx alone would fail such a file).
    my $run_tests = _backend_fn('run_tests');
    *{"${caller}::run_tests"} = sub () {
        Test::More::plan('no_plan') unless Test::More->builder->has_plan;
        $run_tests->();
    };
    # Test::Base's import exports blocks(), plan(), is(), ok(), like(), ...
    # into our caller, takes a plan from @args ('no_plan', tests => N) and
    # reads the caller's __DATA__ blocks, exactly as for Test::Nginx.
    @_ = ($base, @args);
    goto &{ $base->can('import') };
}

1;

__END__

=head1 NAME

Autoscale - test scaffold for lua-resty-autoscale's t/*.t files

=head1 SYNOPSIS

    use lib 't';
    use Autoscale;

    repeat_each(2);
    plan tests => repeat_each() * (blocks() * 3);
    run_tests();

    __DATA__

    === TEST 1: sanity
    --- config
        location = /t { content_by_lua_block { ngx.say("ok") } }
    --- request
    GET /t
    --- response_body
    ok
    --- no_error_log
    [error]

=head1 DEFAULTS

TEST_NGINX_BINARY defaults to /usr/sbin/nginx (for the real Test::Nginx: to
t/Autoscale/nginx, which runs it with its startup stderr appended to the
servroot's logs/error.log, where OpenResty writes such errors and where
Test::Nginx looks for them in must_die blocks). TEST_NGINX_LOAD_MODULES
defaults to Debian's ndk_http_module.so and ngx_http_lua_module.so; set it to
"" for an nginx with Lua built in. Both runners honour both variables.

TEST_NGINX_REPO is the repository root, TEST_NGINX_HTML_DIR the html dir.

Every block's http_config gets
C<lua_package_path "$repo/lua/?.lua;$repo/lua/?/init.lua;$repo/t/lib/?.lua;;">
and C<lua_package_cpath "$repo/target/release/lib?.so;;"> (that directory
from env AUTOSCALE_LIB_DIR if set), each unless the block sets that directive
itself; the same paths go into env LUA_PATH/LUA_CPATH, which is what ";;" in
a block's own directive expands to. A block with a C<--- no_autoscale_defaults>
section gets none of this.

The five *_temp_path directives (under the servroot) are written by the
runner, as Test::Nginx 0.31 and later do: C<proxy_temp_path> and
C<client_body_temp_path> unless the block's http_config has them, the other
three always (a block that sets one of those makes nginx fail with
"directive is duplicate"). With a Test::Nginx older than 0.31, which writes
none, they are added to every block's http_config here.

A file that declares no plan gets C<plan 'no_plan'> from run_tests(), with
either runner.

=head1 THE BUNDLED RUNNER

Used when Test::Nginx::Socket::Lua is missing or AUTOSCALE_MINI_RUNNER=1.
Functions: run_tests repeat_each workers master_on master_off
master_process_enabled log_level no_shuffle no_long_string no_root_location
add_block_preprocessor add_cleanup_handler env_to_nginx server_port
server_root html_dir bail_out timeout worker_connections, plus Test::Base's
(plan blocks is ok like unlike isnt is_deeply cmp_ok pass fail diag skip ...).

Sections: config http_config main_config request (a string, or with C<eval>
an array of requests, each on its own connection; then the expectations are
arrays too) more_headers error_code error_code_like response_body
response_body_like response_body_unlike response_headers
response_headers_like error_log no_error_log grep_error_log
grep_error_log_out timeout wait log_level user_files must_die ignore_response
skip_nginx skip_eval todo abort ONLY SKIP LAST. Environment: TEST_NGINX_SERVER_PORT
(or TEST_NGINX_PORT, default 1984), TEST_NGINX_SERVROOT (default t/servroot),
TEST_NGINX_TIMEOUT, TEST_NGINX_LOG_LEVEL, TEST_NGINX_NO_SHUFFLE,
TEST_NGINX_MASTER_PROCESS, TEST_NGINX_WORKER_USER.

As in Test::Nginx: blocks run in random order unless no_shuffle(); nginx runs
as a daemon with master_process off and one process unless master_on()
(workers(N) counts only then); worker_connections is 64; started as root,
the workers run as root (C<user root;>); log level debug; a location / serving
the html dir unless no_root_location(); one servroot and port per run, so
never run two .t files at once with the same TEST_NGINX_SERVROOT/port.

What Test::Nginx refuses is refused here too, before the block runs and
whatever the order the blocks run in (Test::Nginx finds some of these only
when such a block happens to run first, or after starting nginx); each stops
the file (bail out), as there:

=over

=item * a block without C<--- config> (Test::Nginx then starts no nginx for the
block and sends its request to the previous block's nginx, or bails out when
there is none; a must_die block without one is never checked);

=item * a block without C<--- request>, or with an empty or malformed request
line, unless it is a must_die block;

=item * a section that Test::Nginx acts on and this runner does not support
(see below).

=back

A block whose nginx.conf nginx refuses, e.g. with a directive the runner
writes itself (C<fastcgi_temp_path>, ...), fails with nginx's message and the
lines of nginx.conf that have the directive. A client timeout is a failed test
("ERROR: client socket timed out - ..."), one more than the plan, as with
Test::Nginx, unless the block has C<--- abort>. t/000-runner-can-fail.t checks
each of these against t/selftest/*.t-in, with either runner.

Where it differs from Test::Nginx:

=over

=item * Every repetition (repeat_each) of a block starts a fresh nginx; Test::Nginx
keeps one nginx for all repetitions of a block, so state in shared dicts
carries over there. Write blocks that pass either way.

=item * nginx is stopped (SIGQUIT, waited for) before the final error_log checks,
so these also see what nginx logs while exiting (Test::Nginx checks while it
runs and has --- shutdown_error_log for that, which is not supported here).

=item * error_log, no_error_log and grep_error_log also see what nginx printed on
stderr before its error_log was open (for must_die: the "[emerg] ..." line).

=item * $TEST_NGINX_* variables are also expanded in request, more_headers,
response_body, response_headers, error_log and no_error_log (Test::Nginx
expands only the config sections and user_files). Portable tests use
C<eval> sections with C<$ENV{...}> instead.

=item * no_error_log reports one failure per pattern (Test::Nginx: one per
matching line, which changes the test count only when failing).

=item * A failing block also prints the last non-debug lines of nginx's logs,
and a unified diff for multi-line bodies.

=item * Not supported (a block with one of these sections is refused, see
@Autoscale::Runner::Unsupported): raw_request, pipelined_requests,
request_eval, http2/http3, stap, tcp_listen/udp_listen mock servers,
access_log checks, shutdown_error_log, response_body_filters,
response_body_eval, init, post_main_config, server_name, curl, skip_openssl,
skip_slave, todo_nginx; nor use_hup, check_leak, valgrind.

=back

=cut
